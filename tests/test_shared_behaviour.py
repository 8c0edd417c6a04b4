"""Behaviour both multi-task methods share, tested once for TA-LoRA and MTL-LoRA (and every tiny architecture
where the architecture matters): exactness at init, per-example routing, disabling, generation, save/load,
add_tasks, per-task export and the shared errors. Method-specific behaviour stays in the method's own test files.
"""

import copy
import re

import pytest
import torch
from conftest import ARCH_ATTN, METHODS, batch, logits, make_adapted, tiny_model
from peft import PeftModel
from safetensors.torch import load_file

from peft_talora import MTLLoraModel, TALoraModel

TASKS = torch.tensor([0, 2, 1])
NAMES = ["a", "b", "c"]
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
TUNER = {"talora": TALoraModel, "mtllora": MTLLoraModel}
# The saved tensors that hold one row per task, and the dimension of the task rows.
SAVED_TASK_TENSORS = {"talora": (("task_u", "task_v"), 1), "mtllora": (("mtllora_lambda", "mtllora_logits"), 0)}
VALID = re.escape("ids 0..2 or names ['a', 'b', 'c']")

method_arch = pytest.mark.parametrize(
    "method, arch, attn",
    [(m, a, i) for m in METHODS for a, i in ARCH_ATTN],
    ids=[f"{m}-{a}-{i}" for m in METHODS for a, i in ARCH_ATTN],
)
each_method = pytest.mark.parametrize("method", METHODS)


def named(method, arch="llama", attn="sdpa", **overrides):
    return make_adapted(method, arch, attn, num_tasks=None, task_names=NAMES, **overrides)


#: TA-LoRA's gate scales of the tasks an adapter is created with: fixed at 1 in every stage.
FIXED = "talora_banks.default.task_gate_blocks.0"


def adapter_params(model) -> dict:
    return {n: p for n, p in model.named_parameters() if ".talora_banks." in n or ".mtllora_" in n}


def saved_task_counts(method, path) -> set:
    """The number of task rows in every per-task tensor of the adapter saved at ``path``."""
    suffixes, dim = SAVED_TASK_TENSORS[method]
    tensors = load_file(path / "adapter_model.safetensors")
    counts = {t.shape[dim] for k, t in tensors.items() if k.endswith(suffixes)}
    assert counts, f"no per-task tensors among {sorted(tensors)}"
    return counts


def adamw_steps(model, task_ids, steps=3):
    """A few AdamW steps with weight decay over *all* adapter parameters (frozen ones have no gradient)."""
    optimizer = torch.optim.AdamW(list(adapter_params(model).values()), lr=1e-2, weight_decay=0.1)
    input_ids, mask = batch()
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=task_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


# ------------------------------------------------------------------ every method on every architecture


@method_arch
def test_exact_at_init_for_every_task(method, arch, attn):
    input_ids, mask = batch(left_pad=2)
    base_logits = logits(tiny_model(arch, attn), None, input_ids, mask)
    model = make_adapted(method, arch, attn, trained=False)
    assert isinstance(model.base_model, TUNER[method]) and adapter_params(model)
    for task in range(3):
        out = logits(model, torch.full((3,), task), input_ids, mask)
        assert torch.equal(out, base_logits), f"task {task} differs from the base model at init"


@method_arch
def test_mixed_batch_routes_each_example_to_its_task(method, arch, attn):
    input_ids, mask = batch()
    model = make_adapted(method, arch, attn)
    mixed = logits(model, TASKS)
    for i, task in enumerate(TASKS.tolist()):
        alone = logits(model, [task], input_ids[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    other = logits(model, torch.tensor([1, 0, 2]))
    assert not torch.allclose(mixed, other, atol=1e-3), "different tasks must give different outputs"
    base_logits = logits(tiny_model(arch, attn))
    assert not torch.allclose(mixed, base_logits, atol=1e-3), "a trained adapter must change the outputs"
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
        assert torch.equal(logits(model, TASKS), base_logits)  # task ids are accepted and ignored
    assert torch.equal(logits(model, TASKS), mixed), "leaving disable_adapter restores the adapter"


@method_arch
def test_batched_greedy_generation_equals_per_example(method, arch, attn):
    input_ids, mask = batch(left_pad=2)
    model = make_adapted(method, arch, attn)
    together = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **GREEDY)
    for i, task in enumerate(TASKS.tolist()):
        keep = mask[i].bool()
        alone = model.generate(input_ids=input_ids[i : i + 1, keep], task_ids=[task], **GREEDY)[0, int(keep.sum()) :]
        batched = together[i, input_ids.shape[1] :]
        assert torch.equal(batched[: len(alone)], alone), f"example {i} (task {task}) differs"
        assert (batched[len(alone) :] == 0).all(), "after EOS the batched row holds only padding"


@method_arch
def test_save_load_round_trip_in_fresh_base(method, arch, attn, tmp_path):
    model = named(method, arch, attn)
    expected = logits(model, TASKS)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch, attn), tmp_path)
    assert isinstance(loaded.base_model, TUNER[method])
    assert loaded.peft_config["default"].task_names == NAMES
    assert torch.equal(logits(loaded, ["a", "c", "b"]), expected)


@method_arch
def test_export_of_one_task_is_a_standalone_adapter(method, arch, attn, tmp_path):
    model = named(method, arch, attn)
    expected = logits(model, ["c"] * 3)
    full = logits(model, TASKS)
    model.save_pretrained(tmp_path, tasks=["c"])
    assert model.peft_config["default"].task_names == NAMES, "the export leaves the live adapter untouched"
    assert torch.equal(logits(model, TASKS), full)
    assert saved_task_counts(method, tmp_path) == {1}
    loaded = PeftModel.from_pretrained(tiny_model(arch, attn), tmp_path)
    assert loaded.peft_config["default"].task_names == ["c"] and loaded.peft_config["default"].num_tasks == 1
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-6)  # one task: no task ids needed


# ------------------------------------------------------------------ every method (the architecture does not matter)


@each_method
def test_generate_with_disabled_adapter_equals_base(method):
    model = make_adapted(method)
    input_ids, mask = batch()
    expected = tiny_model().generate(input_ids=input_ids, attention_mask=mask, **GREEDY)
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=input_ids, attention_mask=mask, **GREEDY), expected)
    assert not torch.equal(model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **GREEDY), expected)


@each_method
def test_inside_an_export_the_model_still_routes_and_changes_by_its_real_tasks(method, tmp_path):
    """Only what PEFT's save reads (``PeftModel.peft_config``) is the export's view; the model's own calls in the
    saving context route by the real task ids, changes to the tasks stay with the weights, adapters cannot be added
    or removed mid-save, and an export inside an export is refused."""
    model = named(method)
    expected = {task: logits(model, [task] * 3) for task in NAMES}
    tuner = model.base_model
    with tuner.exporting_tasks(["c"], ["default"]):
        assert model.peft_config["default"].task_names == ["c"]  # what the save writes
        assert torch.equal(logits(model, ["c"] * 3), expected["c"])
        with pytest.raises(ValueError, match="needs `task_ids`"):
            logits(model)  # three tasks, whatever the export shows
        from peft_talora.training.collator import TaskIdEncoder

        assert TaskIdEncoder.from_config(model).encode(["c", "a"]) == [2, 0]  # the data's ids are the real ones
        assert model.add_tasks(["d"]) == [3]
        try:  # TA-LoRA's own add_adapter changes the real configs; PEFT's (MTL-LoRA) would write to the view
            model.add_adapter("other", copy.deepcopy(tuner.peft_config["default"]))
            added = True
        except ValueError as error:
            assert "cannot be added or removed while save_pretrained" in str(error)
            added = False
        with pytest.raises(ValueError, match="already running here"):
            model.save_pretrained(tmp_path / "nested", tasks=["a"])
    assert not (tmp_path / "nested").exists()
    assert model.peft_config["default"].task_names == [*NAMES, "d"]
    assert list(model.peft_config) == (["default", "other"] if added else ["default"])
    model.save_pretrained(tmp_path / "all", selected_adapters=["default"])
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "all")
    assert loaded.peft_config["default"].task_names == [*NAMES, "d"]
    for task in NAMES:
        torch.testing.assert_close(logits(loaded, [task] * 3), expected[task], rtol=1e-5, atol=1e-6)


@each_method
def test_saving_no_adapter_keeps_the_saved_ones(method, tmp_path):
    """PEFT's ``selected_adapters=[]`` saves no adapter; it must not replace the folder's adapter by nothing."""
    model = named(method)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    model.save_pretrained(tmp_path, selected_adapters=[])
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert (tmp_path / "adapter_config.json").is_file()


@each_method
def test_assisted_generation_with_a_plain_or_an_adapted_draft_model(method):
    """transformers hands the draft model every model keyword of the main call: a plain draft must not get the
    routing (it refused the unknown keyword), and an adapted draft routes with its own adapter and the call's task
    ids (it served the main model's prompt bank). Greedy assisted decoding equals greedy decoding."""
    model = named(method)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    draft = named(method)
    seen = []
    own = draft.base_model.routing_for_call

    def recording(task_ids, *args, **kwargs):
        routing = own(task_ids, *args, **kwargs)
        seen.append(list(task_ids))
        return routing

    draft.base_model.routing_for_call = recording
    for task in NAMES:
        expected = model.generate(input_ids=input_ids, task_ids=[task], **GREEDY)
        assert torch.equal(
            model.generate(input_ids=input_ids, task_ids=[task], assistant_model=tiny_model(), **GREEDY), expected
        )
        seen.clear()
        assert torch.equal(
            model.generate(input_ids=input_ids, task_ids=[task], assistant_model=draft, **GREEDY), expected
        )
        assert seen and all(ids == [task] for ids in seen)  # the draft routed itself (it reused the main routing)
    # what transformers gets is the draft itself for every purpose but generate: its class (some draft generators are
    # chosen by class name), its weights, and callable; the draft object is left as it was
    from peft_talora.multitask.routing import _draft_model

    plain = tiny_model()
    view = _draft_model(plain, ["a"])
    assert type(view) is type(plain) and "generate" not in plain.__dict__
    assert next(view.parameters()) is next(plain.parameters())
    assert torch.equal(view(input_ids=input_ids).logits, plain(input_ids=input_ids).logits)


@each_method
def test_generate_without_inputs_starts_from_bos_like_transformers(method):
    """transformers' ``generate()`` with no inputs starts one sequence from BOS; the task of that one row is
    routed like any other (a single-task adapter needs no task_ids)."""
    start = dict(bos_token_id=1, **GREEDY)
    bos = torch.tensor([[1]])
    single = make_adapted(method, num_tasks=1)
    assert torch.equal(single.generate(**start), single.generate(input_ids=bos, **start))
    model = make_adapted(method)
    for task in range(3):
        assert torch.equal(
            model.generate(task_ids=[task], **start), model.generate(input_ids=bos, task_ids=[task], **start)
        )
    with pytest.raises(ValueError, match="every call needs `task_ids`"):
        model.generate(**start)


@each_method
def test_export_of_tasks_in_a_new_order(method, tmp_path):
    model = make_adapted(method)
    model.save_pretrained(tmp_path, tasks=[2, 0])
    assert saved_task_counts(method, tmp_path) == {2}
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert loaded.peft_config["default"].num_tasks == 2 and loaded.peft_config["default"].task_names is None
    torch.testing.assert_close(logits(loaded, [0, 1, 0]), logits(model, [2, 0, 2]), rtol=1e-5, atol=1e-6)


@each_method
def test_a_thread_serving_during_an_export_routes_every_task_by_its_own_config(method, tmp_path, monkeypatch):
    """``save_pretrained(tasks=["c"])`` shows the export's config (``c`` is task 0) only to the saving code; a
    thread serving meanwhile still reads the full config: ``"c"`` is task 2, ``"a"`` exists, and each routes
    to its own factors."""
    import threading

    from peft import PeftConfig

    model = named(method)
    expected = {task: logits(model, [task] * 3) for task in NAMES}
    seen = {}

    def serve():
        seen["names"] = list(model.peft_config["default"].task_names)
        seen["logits"] = {task: logits(model, [task] * 3) for task in NAMES}

    original = PeftConfig.save_pretrained

    def save_config_while_serving(config, *args, **kwargs):  # runs inside the export, in the saving thread
        seen["saving"] = list(model.peft_config["default"].task_names)
        server = threading.Thread(target=serve)
        server.start()
        server.join()
        return original(config, *args, **kwargs)

    monkeypatch.setattr(PeftConfig, "save_pretrained", save_config_while_serving)
    model.save_pretrained(tmp_path, tasks=["c"])
    assert seen["saving"] == ["c"] and seen["names"] == NAMES
    for task in NAMES:
        assert torch.equal(seen["logits"][task], expected[task]), task
    assert model.peft_config["default"].task_names == NAMES and model.base_model._exported_tasks == {}
    monkeypatch.undo()
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert loaded.peft_config["default"].task_names == ["c"]
    torch.testing.assert_close(logits(loaded), expected["c"], rtol=1e-5, atol=1e-6)


@each_method
def test_add_tasks_in_freeze_mode_keeps_old_tasks_bit_identical_and_trains_only_new_blocks(method, tmp_path):
    model = named(method)
    before = {t: logits(model, [t] * 3) for t in NAMES}
    frozen = {n: p.detach().clone() for n, p in adapter_params(model).items()}

    assert model.add_tasks(["d"]) == [3]
    assert model.peft_config["default"].task_names == [*NAMES, "d"]
    assert model.base_model.training_stage() == "new_tasks"
    for t in NAMES:
        assert torch.equal(logits(model, [t] * 3), before[t]), f"adding a task changed task {t}"
    new_block = set(adapter_params(model)) - set(frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert new_block and trainable == new_block, "exactly the new task block trains"
    new_before = logits(model, ["d"] * 3)

    adamw_steps(model, ["d", "a", "d"])  # old tasks in the batch too: their rows get no update
    for t in NAMES:
        assert torch.equal(logits(model, [t] * 3), before[t]), f"training the new task changed task {t}"
    params = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name], value), name
    assert not torch.equal(logits(model, ["d"] * 3), new_before), "the new task must have trained"

    # a second call freezes the first added block as well
    after_d = logits(model, ["d"] * 3)
    assert model.add_tasks(["e"]) == [4]
    adamw_steps(model, ["e", "d", "e"])
    assert torch.equal(logits(model, ["d"] * 3), after_d)
    for t in NAMES:
        assert torch.equal(logits(model, [t] * 3), before[t])

    # saved: the blocks joined into one tensor per kind; loading splits it into the live blocks
    expected = logits(model, ["e", "a", "d"])
    model.save_pretrained(tmp_path)
    assert saved_task_counts(method, tmp_path) == {5}
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert loaded.peft_config["default"].task_names == [*NAMES, "d", "e"]
    assert torch.equal(logits(loaded, ["e", "a", "d"]), expected)
    resumed = named(method, trained=False)
    resumed.add_tasks(["d", "e"])  # blocks of 3 + 2 tasks here, 3 + 1 + 1 in the saved model
    resumed.load_adapter(tmp_path, adapter_name="default")
    assert torch.equal(logits(resumed, ["e", "a", "d"]), expected)


@each_method
def test_add_tasks_without_freeze_and_stages(method):
    model = make_adapted(method)
    before = logits(model, TASKS)
    old = set(adapter_params(model))
    assert model.add_tasks(2, freeze=False) == [3, 4]
    assert model.peft_config["default"].num_tasks == 5 and model.peft_config["default"].task_names is None
    assert model.base_model.training_stage() == "multi_task"
    assert all(p.requires_grad for n, p in adapter_params(model).items() if not n.endswith(FIXED))
    assert torch.equal(logits(model, TASKS), before)
    model.base_model.set_training_stage("new_tasks")
    assert {n for n, p in adapter_params(model).items() if p.requires_grad} == set(adapter_params(model)) - old
    model.base_model.set_training_stage("multi_task")
    assert all(p.requires_grad for n, p in adapter_params(model).items() if not n.endswith(FIXED))
    stages = re.escape(f"Unknown training stage 'warmup'; choose one of {list(TUNER[method].STAGES)}")
    assert {"multi_task", "new_tasks"} <= set(TUNER[method].STAGES)
    with pytest.raises(ValueError, match=stages):
        model.base_model.set_training_stage("warmup")
    with pytest.raises(ValueError, match="has no added tasks to train: call add_tasks"):
        make_adapted(method, trained=False).base_model.set_training_stage("new_tasks")


# ------------------------------------------------------------------ errors


@each_method
def test_an_adapter_that_does_not_exist(method):
    model = named(method)
    message = r"Adapter 'nope' does not exist; available: \['default'\]"
    with pytest.raises(ValueError, match=message):
        model.add_tasks(["x"], adapter_name="nope")
    with pytest.raises(ValueError, match=message):
        model.base_model.set_training_stage("multi_task", adapter_name="nope")
    assert model.peft_config["default"].task_names == NAMES


@each_method
def test_add_tasks_errors_change_nothing(method):
    model = named(method)
    expected = logits(model, TASKS)
    params = {n: p.shape for n, p in adapter_params(model).items()}
    with pytest.raises(ValueError, match=r"add_tasks: task\(s\) \['b'\] already exist in this adapter"):
        model.add_tasks(["x", "b"])
    with pytest.raises(ValueError, match=r"add_tasks: this adapter's tasks have names .*add tasks by name"):
        model.add_tasks(2)
    assert model.peft_config["default"].task_names == NAMES and model.peft_config["default"].num_tasks == 3
    assert {n: p.shape for n, p in adapter_params(model).items()} == params
    assert model.base_model.training_stage() == "multi_task"
    assert torch.equal(logits(model, TASKS), expected)


@each_method
@pytest.mark.parametrize(
    "task_ids, message",
    [
        (None, r"3 tasks, so every call needs `task_ids`.* with " + VALID),
        (torch.tensor([0, 7, 1]), r"Unknown task id\(s\) \[7\]; valid tasks are " + VALID),
        (["a", "w", "b"], r"Unknown task name 'w'; valid tasks are " + VALID),
        (torch.tensor([0, 1]), r"`task_ids` must have shape \(batch,\) = \(3,\), .*got shape \(2,\)"),
        (torch.tensor([[0, 1, 2]]), r"`task_ids` must have shape \(batch,\) = \(3,\), .*got shape \(1, 3\)"),
    ],
    ids=["missing", "unknown-id", "unknown-name", "short", "2d"],
)
def test_bad_task_ids(method, task_ids, message):
    model = named(method)
    expected = logits(model, TASKS)
    with pytest.raises(ValueError, match=message):
        logits(model, task_ids)
    input_ids, mask = batch()
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=input_ids, attention_mask=mask, task_ids=task_ids, **GREEDY)
    assert torch.equal(logits(model, TASKS), expected), "a failed call leaves nothing behind"


@each_method
def test_single_task_adapter_needs_no_task_ids(method):
    model = make_adapted(method, num_tasks=1)
    without = logits(model)
    assert torch.equal(without, logits(model, 0))
    assert not torch.allclose(without, logits(tiny_model()), atol=1e-3)
    with pytest.raises(ValueError, match=r"Unknown task id\(s\) \[1\]; valid tasks are ids 0\.\.0"):
        logits(model, [0, 1, 0])


@each_method
def test_export_of_unknown_task_writes_nothing(method, tmp_path):
    model = named(method)
    with pytest.raises(ValueError, match=r"Unknown task name 'x'; valid tasks are " + VALID):
        model.save_pretrained(tmp_path / "out", tasks=["x"])
    with pytest.raises(ValueError, match=r"unknown task 5; valid tasks are " + VALID):
        model.save_pretrained(tmp_path / "out", tasks=[5])
    assert not (tmp_path / "out").exists()
    assert model.peft_config["default"].task_names == NAMES
