"""``save_pretrained(path, tasks=[t], as_lora=True)``: one MTL-LoRA task as a standard PEFT LoRA adapter.

The exported folder is loaded by plain PEFT in a subprocess that never imports ``peft_talora``
(what a multi-LoRA server does), and its logits equal the MTL-LoRA adapter's routed to ``t``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import batch, tiny_model
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_talora import MTLLoraConfig, TALoraConfig

TASKS = ["sst2", "trec", "boolq"]

# Plain PEFT, as a server would run it: never imports peft_talora, and says so. One process loads every export.
LOAD_WITH_PLAIN_PEFT = """
import json
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

for job in json.loads(sys.argv[1]):
    base = AutoModelForCausalLM.from_pretrained(job["base"])
    model = PeftModel.from_pretrained(base, job["adapter"]).eval()
    assert type(model.base_model).__name__ == "LoraModel", type(model.base_model)
    with torch.no_grad():
        torch.save(model(**torch.load(job["inputs"])).logits, job["out"])
# (the editable install's import finder, a site-packages .pth hook, is not the package)
loaded = sorted(name for name in sys.modules if name == "peft_talora" or name.startswith("peft_talora."))
assert not loaded, loaded
"""


def mtl_model(base_dir, **overrides):
    """A 3-task MTL-LoRA adapter moved away from its initialisation (nonzero B, distinct Lambda and mixing)."""
    torch.manual_seed(0)
    config = dict(task_type="CAUSAL_LM", task_names=TASKS, r=4, lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), MTLLoraConfig(**{**config, **overrides}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mtllora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif ".mtllora_lambda." in name:
                p.copy_(torch.eye(p.shape[-1]) + torch.randn(p.shape, generator=g) * 0.3)
            elif ".mtllora_logits." in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def routed_logits(model, task):
    input_ids, mask = batch(left_pad=2)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, task_ids=[task] * input_ids.shape[0]).logits


#: case -> (architecture, MTL-LoRA config overrides, exported task)
CASES = {
    "llama-q_v": ("llama", {}, "trec"),
    "llama-all-linear": ("llama", {"target_modules": "all-linear", "lora_alpha": 24.0}, "trec"),
    "gpt2-conv1d": ("gpt2", {}, "trec"),
    "llama-one-layer": (
        "llama",
        {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        0,
    ),
    "single-task": ("llama", {"task_names": ["only"]}, None),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case exported with ``as_lora=True``, then loaded by plain PEFT in one subprocess.

    Returns ``{case: (MTL-LoRA model, export folder, plain PEFT's logits)}``.
    """
    root = tmp_path_factory.mktemp("lora_export")
    input_ids, mask = batch(left_pad=2)
    torch.save({"input_ids": input_ids, "attention_mask": mask}, root / "inputs.pt")
    models, jobs = {}, []
    for case, (arch, overrides, task) in CASES.items():
        base_dir, folder = root / case / "base", root / case / "lora"
        tiny_model(arch).save_pretrained(base_dir)
        model = mtl_model(base_dir, **overrides)
        if case == "single-task":  # no tasks= needed; a .bin export is then replaced by a safetensors one
            model.save_pretrained(folder, as_lora=True, safe_serialization=False)
            assert (folder / "adapter_model.bin").is_file()
            model.save_pretrained(folder, as_lora=True)
        else:
            model.save_pretrained(folder, tasks=[task] if isinstance(task, str) else task, as_lora=True)
        models[case] = (model, folder)
        jobs.append(
            {
                "base": str(base_dir),
                "adapter": str(folder),
                "inputs": str(root / "inputs.pt"),
                "out": str(root / f"{case}.pt"),
            }
        )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_PLAIN_PEFT, json.dumps(jobs)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {case: (model, folder, torch.load(root / f"{case}.pt")) for case, (model, folder) in models.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_one_task_exports_as_a_lora_adapter_that_plain_peft_loads(exports, case):
    arch, _, task = CASES[case]
    task = 0 if task is None else task  # a single-task adapter exports its only task
    model, folder, got = exports[case]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config) <= set(LoraConfig().to_dict()) | {"peft_version"}
    assert config["r"] == 4 and config["lora_alpha"] / config["r"] == model.peft_config["default"].scaling
    assert config["base_model_name_or_path"] == str(folder.parent / "base")
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    tensors = load_file(folder / "adapter_model.safetensors")
    adapted = {n: m for n, m in model.named_modules() if hasattr(m, "mtllora_A")}
    assert set(tensors) == {f"{n}.lora_{f}.weight" for n in adapted for f in "AB"}
    for name, layer in adapted.items():
        assert torch.equal(tensors[f"{name}.lora_A.weight"], layer.mtllora_A["default"])  # A is shared: as is
        assert tensors[f"{name}.lora_B.weight"].shape == (layer.out_features, 4)
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "AutoPeftModelForCausalLM.from_pretrained" in (folder / "README.md").read_text()

    torch.testing.assert_close(got, routed_logits(model, task), rtol=0, atol=2e-6)  # float32, exact up to rounding
    config = model.peft_config["default"]
    for other in set(range(config.num_tasks)) - set(config.resolve_task_list(task, case)):  # this task's update only
        assert (routed_logits(model, other) - got).abs().max() > 1e-3


def test_target_modules_are_leaf_names_when_they_match_exactly(exports):
    targets = {
        case: json.loads((folder / "adapter_config.json").read_text())["target_modules"]
        for case, (_, folder, _) in exports.items()
    }
    assert sorted(targets["llama-q_v"]) == ["q_proj", "v_proj"] and targets["gpt2-conv1d"] == ["c_attn"]
    assert sorted(targets["llama-all-linear"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert targets["llama-one-layer"] == ["model.layers.1.self_attn.q_proj"]  # "q_proj" alone would adapt layer 0 too


def test_lora_export_errors_name_the_problem_and_write_nothing(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    model = mtl_model(tmp_path / "base")
    with pytest.raises(ValueError, match=r"has 3 tasks \(\['sst2', 'trec', 'boolq'\]\): pass tasks=\[<one of them>\]"):
        model.save_pretrained(tmp_path / "out", as_lora=True)
    with pytest.raises(ValueError, match="one task per LoRA adapter.*save once per task"):
        model.save_pretrained(tmp_path / "out", tasks=["sst2", "trec"], as_lora=True)
    with pytest.raises(ValueError, match=r"Unknown task name 'mnli'; valid tasks are ids 0..2 or names"):
        model.save_pretrained(tmp_path / "out", tasks=["mnli"], as_lora=True)
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['save_embedding_layers'\]"):
        model.save_pretrained(tmp_path / "out", tasks=["sst2"], as_lora=True, save_embedding_layers=True)
    head = mtl_model(tmp_path / "base", modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_save.*cannot carry"):
        head.save_pretrained(tmp_path / "out", tasks=["sst2"], as_lora=True)
    talora = get_peft_model(
        tiny_model(), TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=2, r=2)
    )
    with pytest.raises(TypeError, match="TA-LoRA has no LoRA form.*generate\\(task_ids=...\\)"):
        talora.save_pretrained(tmp_path / "out", tasks=["sst2"], as_lora=True)
    assert not (tmp_path / "out").exists()


def test_a_failed_or_non_finite_export_leaves_the_previous_export_untouched(tmp_path, monkeypatch):
    """The LoRA export is atomic like every other save: a write that fails midway, or weights holding NaN,
    leave the folder's previous export (and the user's other files there) byte for byte as they were."""
    import peft_talora.mtl_lora.lora_export as lora_export

    tiny_model().save_pretrained(tmp_path / "base")
    model = mtl_model(tmp_path / "base")
    target = tmp_path / "export"
    model.save_pretrained(target, tasks=["trec"], as_lora=True)
    (target / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def failing_save(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lora_export, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target, tasks=["sst2"], as_lora=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before

    layer_param = next(p for n, p in model.named_parameters() if "mtllora_B" in n)
    with torch.no_grad():
        layer_param[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite|NaN"):
        model.save_pretrained(target, tasks=["sst2"], as_lora=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_push_to_hub_as_lora_uploads_the_export_folder(hub, tmp_path):
    """``push_to_hub(repo, tasks=[t], as_lora=True)`` sends the folder ``save_pretrained(..., as_lora=True)``
    writes, in one commit; what was sent loads as plain LoRA with the task's logits. Bad calls send nothing."""
    from peft import PeftModel

    tiny_model().save_pretrained(tmp_path / "base")
    model = mtl_model(tmp_path / "base")
    model.save_pretrained(tmp_path / "saved", tasks=["trec"], as_lora=True)
    model.push_to_hub("me/trec-lora", tasks=["trec"], as_lora=True, commit_message="trec as LoRA")
    assert hub["repo"] == "me/trec-lora"
    saved = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    assert set(hub["files"]) == set(saved) and {"adapter_config.json", "adapter_model.safetensors"} <= set(saved)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert hub["files"][name] == saved[name], name
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, data in hub["files"].items():
        (pulled / name).write_bytes(data)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), pulled).eval()
    assert type(plain.base_model).__name__ == "LoraModel"
    input_ids, mask = batch(left_pad=2)
    with torch.no_grad():
        served = plain(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(served, routed_logits(model, "trec"), atol=1e-5, rtol=1e-5)

    hub.clear()
    with pytest.raises(ValueError, match="pass tasks=\\[<one of them>\\]"):
        model.push_to_hub("me/all", as_lora=True)  # three tasks: which one?
    with pytest.raises(TypeError, match="unsupported \\['max_shard_size'\\]"):
        model.push_to_hub("me/trec-lora", tasks=["trec"], as_lora=True, max_shard_size="1GB")
    talora = get_peft_model(
        tiny_model(), TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=2, r=2)
    )
    with pytest.raises(TypeError, match="TA-LoRA has no LoRA form"):
        talora.push_to_hub("me/talora", tasks=["trec"], as_lora=True)
    assert hub == {}  # nothing was created or sent
