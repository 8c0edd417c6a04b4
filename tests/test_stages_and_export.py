"""Training stages, adding tasks, per-task export and the Hub upload of a TA-LoRA adapter."""

import json
import re

import pytest
import torch
from conftest import batch, perturb, tiny_model
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_talora import TALoraConfig

TASKS = ["sst2", "trec", "boolq"]


def trained(seed: int = 0, **kwargs):
    config = TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=4, r=4, **kwargs)
    return perturb(get_peft_model(tiny_model(), config), seed=seed)


def logits(model, task_ids=None, input_ids=None):
    ids, mask = batch(batch_size=3) if input_ids is None else (input_ids, torch.ones_like(input_ids))
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **extra).logits


def train_steps(model, task_ids, steps: int = 3, weight_decay: float = 0.1):
    """A few AdamW steps (weight decay on) over the trainable parameters."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    input_ids, mask = batch(batch_size=len(task_ids), seed=5)
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=task_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def trainable_names(model):
    return {n.split("talora_banks.default.")[-1] for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ stages
def test_shared_warmup_switches_the_task_part_off_and_trains_only_shared_prompt_and_gates():
    model = trained()
    model.set_training_stage("shared_warmup")
    assert trainable_names(model) == {"shared_prompt", "gate"}
    per_task = [logits(model, task_ids=[t] * 3) for t in range(3)]
    assert torch.equal(per_task[0], per_task[1]) and torch.equal(per_task[0], per_task[2])
    assert torch.equal(logits(model), per_task[0])  # task_ids are optional in the warm-up

    model.set_training_stage("multi_task")
    assert trainable_names(model) == {
        "shared_prompt",
        "shared_basis",
        "task_u_blocks.0",
        "task_v_blocks.0",
        "gate",
    }  # not task_gate_blocks.0: the gate scales of the tasks the adapter was created with stay 1
    assert not torch.equal(logits(model, task_ids=[0] * 3), logits(model, task_ids=[1] * 3))


def test_warmup_training_moves_only_shared_parameters():
    model = trained()
    bank = model.base_model.talora_banks["default"]
    before = {n: p.detach().clone() for n, p in bank.named_parameters()}
    model.set_training_stage("shared_warmup")
    train_steps(model, task_ids=[0, 1, 2])
    changed = {n for n, p in bank.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"shared_prompt", "gate"}


def test_unknown_stage_and_new_tasks_stage_without_new_tasks():
    model = trained()
    with pytest.raises(ValueError, match=r"Unknown training stage 'warmup'; choose one of \['shared_warmup'"):
        model.set_training_stage("warmup")
    with pytest.raises(ValueError, match=re.escape("has no added tasks to train: call add_tasks([...]) first")):
        model.set_training_stage("new_tasks")


# ------------------------------------------------------------------ add_tasks
@pytest.mark.parametrize("start", ["base", "shared_prompt"])
def test_add_tasks_keeps_old_tasks_bit_identical_and_new_tasks_start_where_new_task_start_says(start):
    model = trained(new_task_start=start)
    old = {t: logits(model, task_ids=[t, t, t]) for t in TASKS}
    mixed = logits(model, task_ids=TASKS)

    assert model.add_tasks(["rte", "cola"]) == [3, 4]
    config = model.peft_config["default"]
    assert config.num_tasks == 5 and config.task_names == [*TASKS, "rte", "cola"]
    for t in TASKS:
        assert torch.equal(logits(model, task_ids=[t, t, t]), old[t])
    assert torch.equal(logits(model, task_ids=TASKS), mixed)
    new = logits(model, task_ids=["rte"] * 3)
    if start == "base":  # gate scale c = 0: no prefix at all, the base model bit for bit
        with model.disable_adapter():
            assert torch.equal(new, logits(model))
        assert not torch.allclose(new, old["sst2"])
    else:  # v = 0, so its prompt is the shared prompt, with c = 1: the warm-up output
        model.set_training_stage("shared_warmup")
        assert torch.allclose(new, logits(model), atol=1e-6)


def test_freeze_mode_trains_only_the_new_tasks_and_old_tasks_stay_bit_identical():
    model = trained()
    bank = model.base_model.talora_banks["default"]
    old = logits(model, task_ids=TASKS)
    shared_before = {n: p.detach().clone() for n, p in bank.named_parameters()}
    model.add_tasks(["rte"])
    assert model.training_stage() == "new_tasks"
    assert trainable_names(model) == {"task_u_blocks.1", "task_v_blocks.1", "task_gate_blocks.1"}
    new_before = logits(model, task_ids=["rte"] * 3)

    train_steps(model, task_ids=["rte", "rte", "sst2"], weight_decay=0.1)  # decay would move frozen rows if shared

    for name, value in shared_before.items():
        assert torch.equal(dict(bank.named_parameters())[name], value), name
    assert torch.equal(logits(model, task_ids=TASKS), old)
    assert not torch.allclose(logits(model, task_ids=["rte"] * 3), new_before)


def test_add_tasks_without_freeze_keeps_the_stage_and_trains_everything():
    model = trained()
    model.add_tasks(["rte"], freeze=False)
    assert model.training_stage() == "multi_task"
    assert "task_u_blocks.1" in trainable_names(model) and "shared_prompt" in trainable_names(model)


@pytest.mark.parametrize("method", ["talora", "mtllora"])
@pytest.mark.parametrize("freeze", [True, False], ids=["freeze", "no-freeze"])
def test_add_tasks_or_a_stage_on_an_adapter_not_in_use_trains_nothing_of_it(method, freeze):
    """Only the active adapter trains: add_tasks / set_training_stage on another one leave it frozen (the
    optimizer would otherwise pick up its parameters) until it is made active."""
    from conftest import make_adapted

    from peft_talora import MTLLoraConfig

    model = make_adapted(method)
    other = (
        TALoraConfig(task_type="CAUSAL_LM", task_names=["x"], num_virtual_tokens=4, r=4)
        if method == "talora"
        else MTLLoraConfig(task_type="CAUSAL_LM", task_names=["x"], r=4, target_modules=["q_proj"])
    )
    model.add_adapter("other", other)
    active = {n for n, p in model.named_parameters() if p.requires_grad}
    assert active and not any(".other." in f".{n}." for n in active)
    model.add_tasks(["y"], adapter_name="other", freeze=freeze)
    model.set_training_stage("multi_task", "other")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == active
    model.set_adapter("other")
    assert any(".other." in f".{n}." for n, p in model.named_parameters() if p.requires_grad)


def test_add_tasks_by_count_to_an_unnamed_adapter_and_names_to_it():
    config = TALoraConfig(task_type="CAUSAL_LM", num_tasks=2, num_virtual_tokens=4, r=4)
    model = perturb(get_peft_model(tiny_model(), config))
    assert model.add_tasks(1) == [2]
    assert model.peft_config["default"].task_names is None
    assert model.add_tasks(["extra"]) == [3]
    assert model.peft_config["default"].task_names == ["task_0", "task_1", "task_2", "extra"]


@pytest.mark.parametrize(
    "tasks, message",
    [
        (["trec"], "add_tasks: task(s) ['trec'] already exist in this adapter"),
        (["new", "new"], "add_tasks: ['new'] appear more than once"),
        ([""], "add_tasks: give new task names as non-empty strings"),
        (2, "add_tasks: this adapter's tasks have names"),
    ],
)
def test_add_tasks_bad_input_changes_nothing(tasks, message):
    model = trained()
    bank = model.base_model.talora_banks["default"]
    with pytest.raises(ValueError, match=re.escape(message)):
        model.add_tasks(tasks)
    assert len(bank.task_u_blocks) == 1 and model.peft_config["default"].task_names == TASKS
    assert model.training_stage() == "multi_task"


def test_reload_a_saved_adapter_gain_tasks_train_them_and_save_again(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "v1")
    old = logits(model, task_ids=TASKS)

    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "v1")  # inference mode, as PEFT loads by default
    reloaded.add_tasks(["rte"])
    assert trainable_names(reloaded) == {"task_u_blocks.1", "task_v_blocks.1", "task_gate_blocks.1"}
    train_steps(reloaded, task_ids=["rte"] * 3)
    assert torch.equal(logits(reloaded, task_ids=TASKS), old)
    reloaded.save_pretrained(tmp_path / "v2")

    again = PeftModel.from_pretrained(tiny_model(), tmp_path / "v2")
    assert again.peft_config["default"].task_names == [*TASKS, "rte"]
    assert torch.equal(logits(again, task_ids=[*TASKS[:2], "rte"]), logits(reloaded, task_ids=[*TASKS[:2], "rte"]))
    saved = load_file(tmp_path / "v2" / "adapter_model.safetensors")
    assert saved["base_model.talora_banks.task_u"].shape == (2, 4, 4)  # blocks are saved joined
    assert saved["base_model.talora_banks.task_gate"].shape == (2, 4)


def test_an_adapter_saved_before_task_gate_scales_loads_with_every_c_at_one(tmp_path):
    """Files written before ``task_gate`` existed hold no gate scales; those adapters computed ``c = 1``."""
    from safetensors.torch import save_file

    model = trained()
    with torch.no_grad():  # what an adapter of that time computed
        model.base_model.talora_banks["default"].task_gate_blocks[0].fill_(1.0)
    model.save_pretrained(tmp_path)
    expected = logits(model, task_ids=TASKS)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors["base_model.talora_banks.task_gate"]
    save_file(tensors, weights)

    old = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(old.base_model.talora_banks["default"].task_gate, torch.ones(2, 3))
    assert torch.equal(logits(old, task_ids=TASKS), expected)


def test_new_task_start_must_be_base_or_shared_prompt():
    with pytest.raises(ValueError, match=r"new_task_start must be one of \('base', 'shared_prompt'\) \(got 'zero'\)"):
        TALoraConfig(task_type="CAUSAL_LM", num_tasks=2, new_task_start="zero")


def test_loading_a_grown_adapter_into_a_model_that_has_blocks(tmp_path):
    """Trainer's resume loads a joined file into a model whose tasks were added in blocks."""
    model = trained()
    model.add_tasks(["rte"])
    perturb(model, seed=3)
    model.save_pretrained(tmp_path)
    expected = logits(model, task_ids=[*TASKS[1:], "rte"])

    other = trained(seed=9)
    other.add_tasks(["rte"])
    other.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert torch.equal(logits(other, task_ids=[*TASKS[1:], "rte"]), expected)


# ------------------------------------------------------------------ per-task export
def test_single_task_export_is_standalone_and_equal_to_the_full_adapter(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path / "trec", tasks=["trec"])
    config = json.loads((tmp_path / "trec" / "adapter_config.json").read_text())
    assert config["num_tasks"] == 1 and config["task_names"] == ["trec"]
    tensors = load_file(tmp_path / "trec" / "adapter_model.safetensors")
    assert tensors["base_model.talora_banks.task_v"].shape == (2, 1, 64)

    exported = PeftModel.from_pretrained(tiny_model(), tmp_path / "trec")
    assert torch.equal(logits(exported), logits(model, task_ids=["trec"] * 3))  # no task_ids needed
    input_ids, _ = batch(batch_size=1)
    expected = model.generate(input_ids=input_ids, task_ids=["trec"], max_new_tokens=4, do_sample=False)
    assert torch.equal(exported.generate(input_ids=input_ids, max_new_tokens=4, do_sample=False), expected)

    # the full adapter is untouched by the export
    assert model.peft_config["default"].task_names == TASKS
    assert logits(model, task_ids=TASKS).shape[0] == 3


def test_single_task_export_loads_with_auto_peft_model(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    config = TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=4, r=4)
    model = perturb(get_peft_model(base, config))
    model.save_pretrained(tmp_path / "boolq", tasks="boolq")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "boolq")
    assert torch.equal(logits(auto), logits(model, task_ids=["boolq"] * 3))


def test_multi_task_export_renumbers_in_the_given_order(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path, tasks=[2, "sst2"])
    exported = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert exported.peft_config["default"].task_names == ["boolq", "sst2"]
    assert torch.equal(logits(exported, task_ids=[0, 1, 1]), logits(model, task_ids=[2, 0, 0]))


def test_export_of_added_tasks_reads_across_blocks(tmp_path):
    model = trained()
    model.add_tasks(["rte"])
    perturb(model, seed=4)
    model.save_pretrained(tmp_path, tasks=["rte"])
    exported = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(logits(exported), logits(model, task_ids=["rte"] * 3))


@pytest.mark.parametrize(
    "tasks, message",
    [
        (["nope"], "Unknown task name 'nope'; valid tasks are ids 0..2 or names ['sst2', 'trec', 'boolq']"),
        ([7], "export of adapter 'default': unknown task 7"),
        ([], "export of adapter 'default': the task list is empty"),
        (["trec", 1], "names the same task twice"),
    ],
)
def test_export_of_unknown_tasks_fails_before_writing(tmp_path, tasks, message):
    model = trained()
    target = tmp_path / "existing"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(ValueError, match=re.escape(message)):
        model.save_pretrained(target, tasks=tasks)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    with pytest.raises(ValueError):
        model.save_pretrained(tmp_path / "fresh", tasks=tasks)
    assert not (tmp_path / "fresh").exists()


def test_export_to_a_file_path_is_refused_like_peft(tmp_path):
    model = trained()
    file = tmp_path / "adapter.bin"
    file.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="should be a directory, not a file"):
        model.save_pretrained(file, tasks=["trec"])
    assert file.read_bytes() == b"keep me"


def test_tasks_argument_on_a_method_without_tasks_is_an_error(tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(tiny_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="selects tasks of a multi-task adapter"):
        lora.save_pretrained(tmp_path, tasks=[0])
    lora.save_pretrained(tmp_path)  # without tasks it is PEFT's own save
    assert (tmp_path / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------ model card and Hub
def card_of(folder):
    return ModelCard.load(folder / "README.md")


def test_model_card_names_base_model_library_tag_and_tasks(tmp_path):
    model = trained()
    model.base_model.model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(tmp_path / "full")
    card = card_of(tmp_path / "full")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "ta-lora" in card.data.tags
    assert "`sst2`, `trec`, `boolq`" in card.text

    model.save_pretrained(tmp_path / "one", tasks=["boolq"])
    assert "1 task(s), in id order: `boolq`" in card_of(tmp_path / "one").text
    model.save_pretrained(tmp_path / "full")  # saving again updates, never duplicates, the section
    assert card_of(tmp_path / "full").text.count("## Tasks") == 1


def test_push_to_hub_uploads_the_standard_folder_with_a_peft_model_card(hub, tmp_path):
    model = trained()
    model.base_model.model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.push_to_hub("me/talora-suite")
    assert hub["repo"] == "me/talora-suite"
    assert set(hub["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    readme = hub["files"]["README.md"].decode()
    assert "library_name: peft" in readme and "ta-lora" in readme
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in readme
    assert "`sst2`, `trec`, `boolq`" in readme

    # what was sent loads back into the same adapter
    for name, data in hub["files"].items():
        (tmp_path / name).write_bytes(data)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(logits(loaded, task_ids=TASKS), logits(model, task_ids=TASKS))


def test_push_to_hub_of_one_task(hub):
    model = trained()
    model.push_to_hub("me/talora-trec", tasks=["trec"])
    config = json.loads(hub["files"]["adapter_config.json"])
    assert config["task_names"] == ["trec"]
    assert "1 task(s), in id order: `trec`" in hub["files"]["README.md"].decode()


def test_a_second_add_tasks_freezes_the_first_added_tasks_too():
    model = trained()
    model.add_tasks(["rte"])
    train_steps(model, task_ids=["rte"] * 3)
    after_first = logits(model, task_ids=[*TASKS[:2], "rte"])
    model.add_tasks(["cola"])
    assert trainable_names(model) == {"task_u_blocks.2", "task_v_blocks.2", "task_gate_blocks.2"}
    train_steps(model, task_ids=["cola"] * 3, weight_decay=0.1)
    assert torch.equal(logits(model, task_ids=[*TASKS[:2], "rte"]), after_first)


def test_a_deep_copy_is_an_independent_adapted_model():
    import copy

    model = trained()
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, task_ids=TASKS), logits(model, task_ids=TASKS))
    original = logits(model, task_ids=TASKS)
    with torch.no_grad():
        clone.base_model.talora_banks["default"].gate.mul_(0.5)
    assert torch.equal(logits(model, task_ids=TASKS), original)
    assert not torch.allclose(logits(clone, task_ids=TASKS), original)
    clone.add_tasks(["rte"])
    clone.train()
    input_ids, mask = batch(batch_size=2)
    clone(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=["rte", "rte"]).loss.backward()
    # the new task starts at the base model (c = 0): its gate scale gets the first gradient, v and u none yet
    assert clone.base_model.talora_banks["default"].task_gate_blocks[1].grad.abs().sum() > 0
