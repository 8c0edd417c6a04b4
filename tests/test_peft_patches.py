"""One test per PEFT internal touched by ``peft_talora/peft_patches.py``, so a PEFT upgrade fails loudly here.

Touches: the ``PeftType`` member, ``register_peft_method`` and the mappings it fills, the wrapper around
``PeftModelForCausalLM.forward`` (task ids), the ``is_adaption_prompt`` dispatch of ``PeftModel``, the
state-dict extension points on the tuner class, the atomic ``save_pretrained``, the checks around
``load_adapter`` and ``PeftConfig.from_json_file``.
"""

import importlib
import inspect
import json
import re

import pytest
import torch
from conftest import batch, perturb, perturb_trainable, tiny_model
from peft import (
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    PolyConfig,
    get_peft_model,
)
from peft.utils import PeftType, get_peft_model_state_dict

import peft_talora
from peft_talora import TALoraConfig, TALoraModel
from peft_talora.peft_patches import (
    ROUTED_TASK_IDS_KWARG,
    add_peft_type,
    register_tuner,
    route_task_ids_through_peft_forward,
)

BANK_KEYS = {
    f"base_model.talora_banks.{name}"
    for name in ("shared_prompt", "shared_basis", "task_u", "task_v", "task_gate", "gate")
}


def talora_config(**kwargs):
    config = dict(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4)
    return TALoraConfig(**{**config, **kwargs})


def talora(model=None, **kwargs):
    return get_peft_model(tiny_model() if model is None else model, talora_config(**kwargs))


def logits(model, task_ids=None, **kwargs):
    input_ids, mask = batch()
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, **extra, **kwargs).logits


def assert_registered():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TALORA] is TALoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TALORA] is TALoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TALORA] == "talora_"


# ------------------------------------------------------------------ 1. PeftType member


def test_peft_type_member_exists_and_round_trips():
    member = PeftType.TALORA
    assert isinstance(member, PeftType)
    assert member.value == "TALORA"
    assert member.name == "TALORA"
    assert member == "TALORA"  # PeftType is a str enum
    assert PeftType("TALORA") is member
    assert PeftType["TALORA"] is member
    assert member in list(PeftType)
    assert list(PeftType).count(member) == 1
    assert "TALORA" in PeftType.__members__
    assert talora_config().peft_type is member


def test_add_peft_type_is_idempotent():
    before = list(PeftType)
    first = add_peft_type("TALORA")
    second = add_peft_type("TALORA")
    assert first is second is PeftType.TALORA
    assert list(PeftType) == before
    # members PEFT ships are returned untouched as well
    assert add_peft_type("LORA") is PeftType.LORA
    assert list(PeftType) == before


def test_config_round_trips_peft_type_through_json(tmp_path):
    config = talora_config(task_names=["a", "b", "c"], num_tasks=None)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TALORA"
    assert PeftConfig._get_peft_type(str(tmp_path)) == "TALORA"
    loaded = TALoraConfig.from_pretrained(tmp_path)
    assert loaded.peft_type is PeftType.TALORA


# ------------------------------------------------------------------ 2. register_peft_method


def test_registration_mappings():
    assert_registered()


def test_reimport_and_reload_are_harmless():
    import peft_talora as again  # a second import statement

    assert again is peft_talora
    wrapped = PeftModelForCausalLM.forward
    members = list(PeftType)

    importlib.reload(peft_talora)
    register_tuner("talora", TALoraConfig, TALoraModel)  # what a second import of __init__ does
    route_task_ids_through_peft_forward()

    assert_registered()
    assert list(PeftType) == members
    assert PeftModelForCausalLM.forward is wrapped, "the forward wrapper must not be applied twice"
    # the wrapper wraps PEFT's own forward directly, not another wrapper
    assert not getattr(PeftModelForCausalLM.forward.__wrapped__, "_peft_talora_routes_task_ids", False)
    # the package still works after the reload
    model = perturb(talora())
    assert not torch.equal(logits(model, torch.tensor([0, 0, 0])), logits(model, torch.tensor([1, 1, 1])))


def test_register_peft_method_still_rejects_duplicates():
    """register_tuner relies on register_peft_method raising for an already registered type."""
    from peft.utils import register_peft_method

    with pytest.raises(KeyError, match="already PEFT method called 'talora'"):
        register_peft_method(name="talora", config_cls=TALoraConfig, model_cls=TALoraModel, prefix="talora_")


# ------------------------------------------------------------------ 3. PeftModelForCausalLM.forward wrapper


def test_forward_signature_keeps_task_ids():
    params = inspect.signature(PeftModelForCausalLM.forward).parameters
    assert "task_ids" in params
    assert params["task_ids"].default is None
    assert {"input_ids", "attention_mask", "labels"} <= set(params)
    assert PeftModelForCausalLM.forward._peft_talora_routes_task_ids is True


def test_task_ids_reach_talora_through_peft_forward():
    model = perturb(talora())
    assert isinstance(model, PeftModelForCausalLM)
    assert model.base_model.routes_task_ids is True
    out0 = logits(model, torch.tensor([0, 0, 0]))
    out1 = logits(model, torch.tensor([1, 1, 1]))
    assert not torch.allclose(out0, out1, atol=1e-3)
    # the same ids give the same result, whether through PeftModel or straight into the tuner
    assert torch.equal(out0, logits(model, torch.tensor([0, 0, 0])))
    input_ids, mask = batch()
    with torch.no_grad():
        direct = model.base_model(input_ids=input_ids, attention_mask=mask, task_ids=torch.tensor([0, 0, 0])).logits
        routed = model.base_model(
            input_ids=input_ids, attention_mask=mask, **{ROUTED_TASK_IDS_KWARG: torch.tensor([0, 0, 0])}
        ).logits
    assert torch.equal(direct, out0)
    assert torch.equal(routed, out0)


def test_task_ids_passed_positionally_by_keyword_with_labels():
    """labels + task_ids: the loss is computed from the routed logits."""
    model = perturb(talora())
    input_ids, mask = batch()
    out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=torch.tensor([2, 1, 0]))
    assert out.loss is not None and torch.isfinite(out.loss)
    assert torch.equal(out.logits, logits(model, torch.tensor([2, 1, 0])))


def poly_model():
    config = PolyConfig(task_type="CAUSAL_LM", n_tasks=2, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_model(), config).eval()  # in train mode Poly samples its routing
    g = torch.Generator().manual_seed(0)
    n_lora_b = n_logits = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "poly_lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                n_lora_b += 1
            elif "module_logits" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 3.0)
                n_logits += 1
    # 2 layers x (q_proj, v_proj)
    assert n_lora_b == 4 and n_logits == 4, "PEFT's Poly no longer stores poly_lora_B / poly_router.module_logits"
    return model


def test_poly_still_receives_task_ids():
    model = poly_model()
    assert model.peft_type == PeftType.POLY
    assert not getattr(model.base_model, "routes_task_ids", False)
    out0 = logits(model, torch.tensor([0, 0, 0]))
    out1 = logits(model, torch.tensor([1, 1, 1]))
    assert not torch.allclose(out0, out1, atol=1e-4), "Poly must see task_ids through PeftModelForCausalLM.forward"
    mixed = logits(model, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(mixed[[0, 2]], out0[[0, 2]])
    torch.testing.assert_close(mixed[1], out1[1])
    with pytest.raises(ValueError, match="task_ids should not be None"):
        logits(model)


def test_lora_still_works_without_task_ids():
    base = logits(tiny_model())
    model = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(logits(model), base), "LoRA with B = 0 is the base model"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    changed = logits(model)
    assert not torch.allclose(changed, base, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), changed)


# ------------------------------------------------------------------ 4. is_adaption_prompt dispatch


def test_config_dispatches_like_adaption_prompt():
    config = talora_config()
    assert config.is_adaption_prompt is True
    assert config.is_prompt_learning is False


def test_disable_adapter_gives_base_logits_and_reenables():
    base = logits(tiny_model(), None)
    model = perturb(talora())
    ids = torch.tensor([0, 2, 1])
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
        assert torch.equal(logits(model, ids), base)  # task ids are accepted and ignored
        with model.disable_adapter():  # nested: stays disabled, and the outer exit re-enables
            assert torch.equal(logits(model), base)
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model, ids), adapted)


def test_disable_adapter_reenables_after_an_exception():
    model = perturb(talora())
    ids = torch.tensor([0, 2, 1])
    adapted = logits(model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with model.disable_adapter():
            raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), adapted)


def trainable(model, adapter):
    flags = {n: p.requires_grad for n, p in model.named_parameters() if f"talora_banks.{adapter}." in n}
    assert len(flags) == 6
    assert not flags[f"base_model.talora_banks.{adapter}.task_gate_blocks.0"]  # the first block's c stays 1
    del flags[f"base_model.talora_banks.{adapter}.task_gate_blocks.0"]
    return set(flags.values())


def test_add_set_delete_adapter():
    model = perturb(talora())
    ids = torch.tensor([0, 2, 1])
    default_out = logits(model, ids)
    model.add_adapter("second", talora_config(num_tasks=2, num_virtual_tokens=3, r=2))
    assert set(model.peft_config) == {"default", "second"}
    assert model.active_adapter == "default"
    assert trainable(model, "default") == {True}
    assert trainable(model, "second") == {False}
    assert torch.equal(logits(model, ids), default_out), "a new adapter must not change the active one"
    # only base params besides the banks: everything else stays frozen
    others = {n for n, p in model.named_parameters() if p.requires_grad and "talora_banks" not in n}
    assert others == set()

    model.set_adapter("second")
    assert model.active_adapter == "second"
    assert model.base_model.active_adapter == "second"
    assert trainable(model, "default") == {False}
    assert trainable(model, "second") == {True}
    # second is untrained (gates at zero): the base model, for both of its task ids
    base = logits(tiny_model())
    assert torch.equal(logits(model, torch.tensor([0, 1, 1])), base)
    with pytest.raises(ValueError, match=r"ids 0\.\.1"):
        logits(model, ids)  # task 2 exists only in "default"

    model.set_adapter("default")
    assert trainable(model, "default") == {True} and trainable(model, "second") == {False}
    assert torch.equal(logits(model, ids), default_out)

    model.delete_adapter("second")
    assert set(model.peft_config) == {"default"}
    assert list(model.base_model.talora_banks) == ["default"]
    assert not any("talora_banks.second" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, ids), default_out)


def test_delete_active_adapter_falls_back_to_the_other():
    model = perturb(talora())
    ids = torch.tensor([0, 2, 1])
    default_out = logits(model, ids)
    model.add_adapter("second", talora_config())
    model.set_adapter("second")
    model.delete_adapter("second")
    assert model.active_adapter == "default"
    assert torch.equal(logits(model, ids), default_out)


def test_set_adapter_inference_mode_freezes():
    model = talora()
    model.add_adapter("second", talora_config())
    model.set_adapter("second", inference_mode=True)
    assert trainable(model, "second") == {False}
    assert trainable(model, "default") == {False}


def test_load_adapter_under_new_name(tmp_path):
    trained = perturb(talora(task_names=["a", "b", "c"], num_tasks=None), seed=3)
    ids = torch.tensor([0, 2, 1])
    expected = logits(trained, ids)
    trained.save_pretrained(tmp_path)
    saved = get_peft_model_state_dict(trained)

    model = talora(task_names=["a", "b", "c"], num_tasks=None)
    untrained = logits(model, ids)
    model.load_adapter(tmp_path, adapter_name="x")
    assert set(model.peft_config) == {"default", "x"}
    assert model.peft_config["x"].task_names == ["a", "b", "c"]
    assert model.active_adapter == "default", "load_adapter must not activate the new adapter"
    assert trainable(model, "x") == {False}
    loaded = get_peft_model_state_dict(model, adapter_name="x")
    assert set(loaded) == set(saved) == BANK_KEYS
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    assert torch.equal(logits(model, ids), untrained)
    model.set_adapter("x")
    assert torch.equal(logits(model, ["a", "c", "b"]), expected)


def test_load_adapter_is_trainable(tmp_path):
    perturb(talora()).save_pretrained(tmp_path)
    model = talora()
    model.load_adapter(tmp_path, adapter_name="x", is_trainable=True)
    assert trainable(model, "x") == {True}
    assert model.active_adapter == "default"


# ------------------------------------------------------------------ 5. state-dict hooks


def test_state_dict_has_bank_keys_without_adapter_name():
    model = perturb(talora())
    state = get_peft_model_state_dict(model)
    assert set(state) == BANK_KEYS
    bank = model.base_model.talora_banks["default"]
    assert state["base_model.talora_banks.shared_prompt"].shape == (2, 4, 64)
    assert state["base_model.talora_banks.shared_basis"].shape == (2, 4, 4)
    assert state["base_model.talora_banks.task_u"].shape == (2, 3, 4)
    assert state["base_model.talora_banks.task_v"].shape == (2, 3, 64)
    assert state["base_model.talora_banks.task_gate"].shape == (2, 3)
    assert state["base_model.talora_banks.gate"].shape == (2, 4)
    for name in ("shared_prompt", "shared_basis", "task_u", "task_v", "task_gate", "gate"):
        assert torch.equal(state[f"base_model.talora_banks.{name}"], getattr(bank, name))


def test_state_dict_with_two_adapters_has_only_the_requested_one():
    model = perturb(talora())
    model.add_adapter("second", talora_config(num_tasks=2, num_virtual_tokens=3, r=2))
    default = get_peft_model_state_dict(model)
    second = get_peft_model_state_dict(model, adapter_name="second")
    assert set(default) == set(second) == BANK_KEYS
    assert default["base_model.talora_banks.task_u"].shape == (2, 3, 4)
    assert second["base_model.talora_banks.task_u"].shape == (2, 2, 2)
    assert second["base_model.talora_banks.shared_prompt"].shape == (2, 3, 64)
    bank = model.base_model.talora_banks["second"]
    assert torch.equal(second["base_model.talora_banks.task_u"], bank.task_u)
    # an adapter whose name contains the other's ("default" in "default2") does not leak in
    model.add_adapter("default2", talora_config(num_tasks=5))
    assert get_peft_model_state_dict(model)["base_model.talora_banks.task_u"].shape == (2, 3, 4)
    assert get_peft_model_state_dict(model, adapter_name="default2")["base_model.talora_banks.task_u"].shape == (
        2,
        5,
        4,
    )


def test_save_pretrained_files(tmp_path):
    model = perturb(talora(task_names=["sst2", "trec", "qnli"], num_tasks=None))
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter_model.safetensors")) == BANK_KEYS
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TALORA"
    assert saved["task_names"] == ["sst2", "trec", "qnli"]
    assert saved["num_tasks"] == 3


def test_peft_config_property_shows_an_export_only_in_its_context():
    """PEFT's save reads ``PeftModel.peft_config`` (a property over ``base_model.peft_config``); inside a tuner's
    ``exporting_tasks`` it is the export's view, elsewhere PEFT's own getter, and its setter is PEFT's."""
    prop = PeftModel.peft_config
    assert isinstance(prop, property) and prop.fset is not None
    model = talora(task_names=["a", "b", "c"], num_tasks=None)
    assert model.peft_config is model.base_model.peft_config
    with model.base_model.exporting_tasks(["b"], ["default"]):
        assert model.peft_config["default"].task_names == ["b"]
        assert model.base_model.peft_config["default"].task_names == ["a", "b", "c"]
    assert model.peft_config is model.base_model.peft_config
    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert lora.peft_config is lora.base_model.peft_config  # other tuners: PEFT's getter


def test_save_pretrained_second_adapter_in_subfolder(tmp_path):
    model = perturb(talora())
    model.add_adapter("second", talora_config(num_tasks=2))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    second = load_file(tmp_path / "second" / "adapter_model.safetensors")
    assert set(second) == BANK_KEYS
    assert second["base_model.talora_banks.task_u"].shape == (2, 2, 4)
    assert load_file(tmp_path / "adapter_model.safetensors")["base_model.talora_banks.task_u"].shape == (2, 3, 4)


def test_peft_config_from_pretrained(tmp_path):
    talora(task_names=["sst2", "trec"], num_tasks=None, r=2, alpha=4.0, adapter_layers=[-1]).save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is TALoraConfig
    assert config.peft_type is PeftType.TALORA
    assert config.task_names == ["sst2", "trec"]
    assert config.num_tasks == 2
    assert config.r == 2 and config.alpha == 4.0 and config.scaling == 2.0
    assert config.adapter_layers == [-1]
    assert config.num_virtual_tokens == 4


def test_auto_peft_model_from_local_base(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa").eval()
    model = perturb(get_peft_model(base, talora_config(task_names=["a", "b", "c"], num_tasks=None)))
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    ids = torch.tensor([0, 2, 1])
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, PeftModelForCausalLM)
    assert isinstance(loaded.base_model, TALoraModel)
    assert loaded.peft_config["default"].task_names == ["a", "b", "c"]
    assert not loaded.training
    assert torch.equal(logits(loaded, ids), expected)
    assert torch.equal(logits(loaded, ["a", "c", "b"]), expected)


def test_peft_model_from_pretrained_is_trainable(tmp_path):
    perturb(talora()).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert trainable(frozen, "default") == {False}
    live = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    assert trainable(live, "default") == {True}


# ------------------------------------------------------------------ 6. print_trainable_parameters


def expected_trainable(L, T, n, d, r, H):
    """theta0 (n, d) and B (n, r) per layer, u (r) and v (d) per layer and task, g (H) per layer (the gate
    scales c, one per layer and task, are parameters too, fixed for the tasks an adapter is created with)."""
    return L * (n * d + n * r + T * (r + d) + H)


@pytest.mark.parametrize(
    "kwargs, L",
    [
        (dict(num_tasks=3, num_virtual_tokens=4, r=4), 2),
        (dict(num_tasks=5, num_virtual_tokens=10, r=8), 2),
        (dict(num_tasks=1, num_virtual_tokens=2, r=1, adapter_layers=[-1]), 1),
    ],
)
def test_print_trainable_parameters(capsys, kwargs, L):
    base_params = sum(p.numel() for p in tiny_model().parameters())
    model = get_peft_model(tiny_model(), TALoraConfig(task_type="CAUSAL_LM", **kwargs))
    count = expected_trainable(L, kwargs["num_tasks"], kwargs["num_virtual_tokens"], 64, kwargs["r"], 4)
    capsys.readouterr()
    model.print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    total = base_params + count + L * kwargs["num_tasks"]  # + the fixed gate scales
    assert out == f"trainable params: {count:,d} || all params: {total:,d} || trainable%: {100 * count / total:.4f}"
    assert model.get_nb_trainable_parameters() == (count, total)


def test_print_trainable_parameters_exact_numbers(capsys):
    model = talora()  # L=2, T=3, n=4, d=64, r=4, H=4
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert re.search(r"trainable params: 960 \|\|", out), out
    # a second, inactive adapter adds nothing trainable
    model.add_adapter("second", talora_config(num_tasks=7))
    model.print_trainable_parameters()
    assert re.search(r"trainable params: 960 \|\|", capsys.readouterr().out)


def test_reload_of_every_module_of_the_package_is_harmless():
    """``importlib.reload`` of the submodules and then the package (what a notebook's deep reload does).

    Run in a child process so the new class objects cannot leak into the other tests.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import importlib, peft_talora, peft_talora.talora.config, peft_talora.talora.model\n"
        "importlib.reload(peft_talora.talora.config)\n"
        "importlib.reload(peft_talora.talora.model)\n"
        "importlib.reload(peft_talora)\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
        "from peft.utils import PeftType\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.TALORA] is peft_talora.TALoraConfig\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.TALORA] is peft_talora.TALoraModel\n"
        "print('reloaded')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("reloaded")


# ------------------------------------------------------------------ 7. BaseTuner hooks overridden by MTL-LoRA


def test_base_tuner_hooks_that_mtl_lora_overrides(monkeypatch):
    """``MTLLoraModel`` is a ``BaseTuner`` subclass and overrides a few private hooks; PEFT must still call them.

    ``_pre_injection_hook`` (tuner state before injection), the layers' ``_freeze_non_trainable_peft_weights``
    (keeps the ``new_tasks`` stage's frozen parts frozen after every ``requires_grad`` change),
    ``_enable_adapter_layers`` (``disable_adapter``) and ``_unload_and_optionally_merge`` (takes the router off).
    """
    from peft_talora import MTLLoraConfig
    from peft_talora.mtl_lora import MTLLoraLayer, MTLLoraModel

    seen = []
    hooks = [
        (MTLLoraModel, "_pre_injection_hook"),
        (MTLLoraLayer, "_freeze_non_trainable_peft_weights"),
        (MTLLoraModel, "_enable_adapter_layers"),
        (MTLLoraModel, "_unload_and_optionally_merge"),
    ]
    for cls, name in hooks:
        original = getattr(cls, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            seen.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    config = MTLLoraConfig(task_type="CAUSAL_LM", num_tasks=2, r=2, target_modules=["q_proj"])
    model = get_peft_model(tiny_model(), config)
    assert seen.index("_pre_injection_hook") < seen.index("_freeze_non_trainable_peft_weights")
    for call in (lambda: model.set_adapter("default"), lambda: model.base_model.set_requires_grad("default")):
        seen.clear()
        call()
        assert "_freeze_non_trainable_peft_weights" in seen
    seen.clear()
    with model.disable_adapter():
        assert seen == ["_enable_adapter_layers"]
    assert seen.count("_enable_adapter_layers") == 2
    seen.clear()
    base = model.unload()
    assert "_unload_and_optionally_merge" in seen
    assert "forward" not in base.__dict__ and "generate" not in base.__dict__, "unload takes the task router off"
    assert not base._forward_pre_hooks


def test_unreadable_weights_of_other_methods_keep_peft_error(tmp_path):
    """explain_unreadable_adapter_files only rewrites errors for this package's adapters."""
    from safetensors import SafetensorError

    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage" * 8)
    with pytest.raises(SafetensorError):
        PeftModel.from_pretrained(tiny_model(), tmp_path)


# ------------------------------------------------------------------ 5. atomic saves (save_pretrained wrapper)


def test_save_wrapper_keeps_peft_signature_and_binds_its_arguments(tmp_path, monkeypatch):
    """The atomic save binds PEFT's own ``save_pretrained`` signature to find ``selected_adapters`` and
    ``is_main_process``; if PEFT renames them, these calls would write into the target directly."""
    from peft_talora.multitask import atomic_save as atomic

    params = inspect.signature(inspect.unwrap(PeftModel.save_pretrained)).parameters
    assert {"save_directory", "selected_adapters", "is_main_process", "safe_serialization"} <= set(params)
    calls = []
    real = atomic.write_folder_atomically
    monkeypatch.setattr(
        "peft_talora.peft_patches.write_folder_atomically", lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    )
    model = perturb(talora())
    model.save_pretrained(tmp_path / "a", False, ["default"])  # positional safe_serialization, selected_adapters
    assert calls == [str(tmp_path / "a")] and (tmp_path / "a" / "adapter_model.bin").exists()
    model.save_pretrained(tmp_path / "b", is_main_process=False)  # PEFT writes nothing on other ranks
    assert calls == [str(tmp_path / "a")] and not (tmp_path / "b" / "adapter_config.json").exists()


def test_save_of_other_methods_is_peft_own(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a LoRA save must not go through the atomic writer")

    monkeypatch.setattr("peft_talora.peft_patches.write_folder_atomically", refuse)
    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_active_peft_config_of_a_model_without_adapters():
    """``explain_missing_adapter`` replaces PEFT's ``active_peft_config`` property for our tuners only."""
    assert isinstance(PeftModel.__dict__["active_peft_config"], property)
    model = talora()
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter left: 'default' was its last one"):
        logits(model, [0, 1, 2])
    model.add_adapter("new", talora_config())
    model.set_adapter("new")
    assert model.active_peft_config is model.peft_config["new"]
    assert logits(model, [0, 1, 2]).shape == (3, 7, 128)
    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.delete_adapter("default")
    with pytest.raises(KeyError):  # other methods keep PEFT's behaviour
        _ = lora.active_peft_config


def test_save_with_no_adapter_left(tmp_path):
    model = talora()
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter left to save .* Nothing was written"):
        model.save_pretrained(tmp_path / "never-written")
    assert not (tmp_path / "never-written").exists()


# ------------------------------------------------------------------ 7./8. damaged and mislabelled files on load


def _relabel(folder, peft_type):
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["peft_type"] = peft_type
    path.write_text(json.dumps(saved))
    return path


def test_from_json_file_refuses_an_unregistered_peft_type(tmp_path):
    perturb(talora()).save_pretrained(tmp_path)
    path = _relabel(tmp_path, "NOPE")
    message = re.escape(f"{path} says \"peft_type\": 'NOPE', which no installed PEFT method registers")
    fix = re.escape('write "peft_type": "TALORA" in the file')
    # every PEFT entry point that reads a config goes through PeftConfig.from_json_file
    for load in (
        lambda: PeftConfig.from_pretrained(tmp_path),
        lambda: PeftConfig._get_peft_type(str(tmp_path)),
        lambda: PeftModel.from_pretrained(tiny_model(), tmp_path),
        lambda: talora().load_adapter(tmp_path, adapter_name="other"),
    ):
        with pytest.raises(ValueError, match=f"{message}.*{fix}"):
            load()
    # a config that fits none of our methods lists the known types instead
    path.write_text(json.dumps({"peft_type": "NOPE", "r": 4}))
    with pytest.raises(ValueError, match=r"no installed PEFT method registers\. Known types: \[.*'LORA'.*'TALORA'"):
        PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("label, method", [("LORA", "TALORA"), ("MTLLORA", "TALORA"), ("TALORA", "MTLLORA")])
def test_from_json_file_refuses_our_config_under_another_label(tmp_path, label, method):
    from peft_talora import MTLLoraConfig

    if method == "TALORA":
        model = talora()
    else:
        model = get_peft_model(
            tiny_model(), MTLLoraConfig(task_type="CAUSAL_LM", num_tasks=2, target_modules=["q_proj"])
        )
    model.save_pretrained(tmp_path)
    _relabel(tmp_path, label)
    with pytest.raises(
        ValueError,
        match=rf"says \"peft_type\": '{label}', but its keys \[.*\] are not .*Config's: "
        rf"it is a {method} adapter's config.*Write \"peft_type\": \"{method}\"",
    ):
        PeftModel.from_pretrained(tiny_model(), tmp_path)


def test_from_json_file_leaves_other_methods_configs_alone(tmp_path):
    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    assert type(PeftConfig.from_pretrained(tmp_path)) is LoraConfig
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert loaded.peft_config["default"].peft_type is PeftType.LORA


def test_load_adapter_missing_weights_file(tmp_path):
    perturb(talora()).save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / "adapter_model.safetensors").unlink()
    message = re.escape(f"The adapter folder '{tmp_path / 'ours'}' has adapter_config.json but no weights file")
    with pytest.raises(ValueError, match=f"{message}.*Save the adapter again"):
        PeftModel.from_pretrained(tiny_model(), tmp_path / "ours")
    model = talora()
    with pytest.raises(ValueError, match=message):
        model.load_adapter(tmp_path / "ours", adapter_name="other")
    assert list(model.peft_config) == ["default"]
    # other methods keep PEFT's own behaviour (it looks for the file on the Hub)
    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(Exception) as info:
        PeftModel.from_pretrained(tiny_model(), tmp_path / "lora")
    assert "no weights file" not in str(info.value)


def test_load_adapter_checks_loaded_weights_of_our_methods_only(tmp_path):
    """Non-finite values are looked for in what PEFT loaded (get_peft_model_state_dict), for our methods only."""
    from safetensors.torch import load_file, save_file

    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    next(iter(tensors.values())).fill_(float("nan"))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    PeftModel.from_pretrained(tiny_model(), tmp_path)  # PEFT's own behaviour for other methods: no check


@pytest.mark.parametrize("method", ["talora", "mtllora"])
def test_a_failed_load_into_an_existing_adapter_leaves_its_values(tmp_path, method):
    """PEFT copies the file's weights in before they can be checked: a file with a NaN loaded into the adapter in
    use (Trainer resuming, load_best_model_at_end) raises and the adapter keeps the values it had."""
    from safetensors.torch import load_file, save_file

    from peft_talora import MTLLoraConfig

    def build():
        if method == "talora":
            return perturb(talora())
        config = MTLLoraConfig(task_type="CAUSAL_LM", num_tasks=3, r=4, target_modules=["q_proj"], lora_dropout=0.0)
        return perturb_trainable(get_peft_model(tiny_model(), config))

    build().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors[sorted(tensors)[-1]].view(-1)[0] = float("nan")
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = build().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = logits(model, task_ids=[0, 1, 2])
    with pytest.raises(ValueError, match=r"holds non-finite values.*The load was stopped and adapter 'default' keeps"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model, task_ids=[0, 1, 2]), expected)


def test_loading_into_an_existing_adapter_checks_the_file_s_base_model_and_layout(tmp_path):
    """The file's own base_model_shape and layout fields are compared with the existing adapter's before anything
    is loaded: factors of layer 0 must not land in a layer-1 adapter of the same shapes."""
    perturb(talora(adapter_layers=[0])).save_pretrained(tmp_path / "layer0")
    model = talora(adapter_layers=[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"another layout \(adapter_layers: \[0\] in the file, \[1\] here\)"):
        model.load_adapter(tmp_path / "layer0", adapter_name="default")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    perturb(talora()).save_pretrained(tmp_path / "two-kv-heads")
    other_base = talora(tiny_model(num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"another base model \(num_key_value_heads: 2 in the file, 4 here"):
        other_base.load_adapter(tmp_path / "two-kv-heads", adapter_name="default")
    talora(adapter_layers=[0]).load_adapter(tmp_path / "layer0", adapter_name="default")  # the same layout loads


def test_save_records_the_base_model_shape_and_load_checks_it(tmp_path):
    """``save_pretrained`` writes ``base_model_shape`` through PEFT's config saving; ``load_adapter`` compares it."""
    perturb(talora()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_shape"]
    assert saved == {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    with pytest.raises(ValueError, match=r"saved from another base model \(num_key_value_heads: 2 in the file, 4 here"):
        PeftModel.from_pretrained(tiny_model(num_key_value_heads=4), tmp_path)
    model = talora()
    model.load_adapter(tmp_path, adapter_name="other")
    assert model.peft_config["other"].base_model_shape == saved
