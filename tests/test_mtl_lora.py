"""MTL-LoRA (``MTLLoraConfig``): what only MTL-LoRA has (its formula, targets, parameters, merging, Conv1D,
its config and load errors) and its PEFT plumbing.

What both methods share (exactness at init, routing, disabling, generation, save/load, add_tasks, per-task
export and the task-id errors) is tested once for both in ``test_shared_behaviour.py``.
"""

import json
import re

import pytest
import torch
from conftest import batch, cpu_training_args, logits, tiny_model
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from peft.utils import PeftType, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from peft_talora import MTLLoraConfig, MTLLoraModel
from peft_talora.mtl_lora import MTLLoraLayer
from peft_talora.multitask.routing import CallRouting, routing_scope
from peft_talora.peft_patches import ROUTED_TASK_IDS_KWARG

TASKS = torch.tensor([0, 2, 1])
NAMES = ["a", "b", "c"]
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def mtl_config(**kwargs):
    config = dict(task_type="CAUSAL_LM", num_tasks=3, r=4, target_modules="all-linear", lora_dropout=0.0)
    return MTLLoraConfig(**{**config, **kwargs})


def mtl(model=None, **kwargs):
    return get_peft_model(tiny_model() if model is None else model, mtl_config(**kwargs))


def named(model=None, **kwargs):
    return mtl(model, num_tasks=None, task_names=NAMES, **kwargs)


def perturb(peft_model, seed=0, scale=0.3):
    """Stand-in for training: nonzero up-projections, distinct Lambda and mixing weights per task."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".mtllora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif ".mtllora_lambda." in name:
                p.copy_(torch.eye(p.shape[-1]) + torch.randn(p.shape, generator=g) * scale)
            elif ".mtllora_logits." in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return peft_model


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if ".mtllora_" in n}


# ------------------------------------------------------------------ every architecture


def test_merge_and_unload_of_one_task_equals_the_adapter(arch_attn):
    arch, attn = arch_attn
    model = perturb(named(tiny_model(arch, attn)))
    expected = {task: logits(model, [task] * 3) for task in ("b", "c")}
    merged = model.merge_and_unload(task="b")
    assert not any(isinstance(m, MTLLoraLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny_model(arch, attn).state_dict())
    out = logits(merged)  # a plain transformers model again: no task ids
    torch.testing.assert_close(out, expected["b"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, expected["c"], atol=1e-3)


# ------------------------------------------------------------------ registration and PEFT plumbing


def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PeftType("MTLLORA") is PeftType.MTLLORA
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MTLLORA] is MTLLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MTLLORA] is MTLLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MTLLORA] == "mtllora_"
    config = MTLLoraConfig(num_tasks=2)
    assert config.peft_type is PeftType.MTLLORA
    assert not config.is_prompt_learning and not config.is_adaption_prompt
    assert (config.r, config.lora_alpha, config.num_up_projections, config.temperature) == (8, 16.0, 3, 1.0)
    assert config.scaling == 2.0


def test_layer_computes_the_mtl_lora_formula():
    """``h = W x + (alpha / r) * sum_i softmax(w_t / tau)_i B_i Lambda_t A x``, checked example by example."""
    for arch, module in (("llama", "q_proj"), ("gpt2", "c_attn")):
        model = perturb(mtl(tiny_model(arch), temperature=0.5, lora_alpha=6.0, target_modules=[module]))
        layer = next(m for m in model.modules() if isinstance(m, MTLLoraLayer))
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), routing_scope(CallRouting(TASKS)):
            out = layer(x)
            A, B = layer.mtllora_A["default"], layer.mtllora_B["default"]
            for b, t in enumerate(TASKS.tolist()):
                p = torch.softmax(layer.task_logits("default")[t] / 0.5, dim=-1)
                update = sum(p[i] * B[i] for i in range(B.shape[0])) @ layer.task_lambdas("default")[t] @ A
                expected = layer.get_base_layer()(x[b]) + (6.0 / 4) * x[b] @ update.T
                torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)


def test_inject_adapter_in_model_is_refused():
    from peft import inject_adapter_in_model

    with pytest.raises(ValueError, match="shared state"):
        inject_adapter_in_model(mtl_config(), tiny_model())


def test_target_modules_all_linear_default_and_list():
    def adapted(model):
        return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, MTLLoraLayer)}

    assert adapted(mtl()) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    gpt2 = mtl(tiny_model("gpt2"))
    assert adapted(gpt2) == {"c_attn", "c_proj", "c_fc"}  # GPT-2's Conv1D projections; never the lm_head
    assert all(isinstance(m.get_base_layer(), Conv1D) for m in gpt2.modules() if isinstance(m, MTLLoraLayer))
    assert adapted(mtl(target_modules=None)) == {"q_proj", "v_proj"}  # LoRA's defaults for the architecture
    assert adapted(mtl(tiny_model("phi3"), target_modules=None)) == {"qkv_proj"}
    assert adapted(mtl(target_modules=["o_proj"])) == {"o_proj"}
    layered = mtl(target_modules=["q_proj"], layers_to_transform=[1])
    assert [n for n, m in layered.named_modules() if isinstance(m, MTLLoraLayer)] == [
        "base_model.model.model.layers.1.self_attn.q_proj"
    ]


@pytest.mark.parametrize("layers", [[1, 7], 7])
def test_layers_that_the_model_lacks_are_refused_before_anything_changes(layers):
    """PEFT adapts the layers that exist and skips the rest silently; a typo'd or out-of-range index is refused."""
    base = tiny_model()  # 2 decoder layers
    with pytest.raises(ValueError, match=r"layers_to_transform names layer\(s\) \[7\].*has 2 decoder layers: 0\.\.1"):
        mtl(base, target_modules=["q_proj"], layers_to_transform=layers)
    assert not any(isinstance(m, MTLLoraLayer) for m in base.modules())
    model = mtl(target_modules=["q_proj"], layers_to_transform=[0])
    with pytest.raises(ValueError, match=r"layers_to_transform names layer\(s\) \[7\]"):
        model.add_adapter(
            "other",
            MTLLoraConfig(task_type="CAUSAL_LM", num_tasks=2, target_modules=["q_proj"], layers_to_transform=layers),
        )
    assert list(model.peft_config) == ["default"]
    assert not any("other" in n for n, _ in model.named_parameters())


def test_a_safe_merge_that_fails_half_way_leaves_no_layer_merged():
    """``safe_merge`` finds inf in the last layer's update of task 1: the layers merged before it are undone, so
    task 0 is still served right, by its own update, and can be merged."""
    from peft_talora.mtl_lora.layer import MTLLoraLayer

    model = perturb(mtl(num_tasks=3))
    layers = [m for m in model.modules() if isinstance(m, MTLLoraLayer)]
    weights = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    before = logits(model, task_ids=[0, 0, 0])
    with torch.no_grad():
        layers[-1].mtllora_lambda["default"][0][1].fill_(float("inf"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(task=1, safe_merge=True)
    assert not any(layer.merged for layer in layers) and model.base_model._merged_tasks == {}
    assert all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(layers, weights))
    assert torch.equal(logits(model, task_ids=[0, 0, 0]), before)
    model.merge_adapter(task=0, safe_merge=True)
    torch.testing.assert_close(logits(model, task_ids=[0, 0, 0]), before, rtol=1e-5, atol=1e-5)


def test_parameter_shapes_and_trainable_count(capsys):
    model = mtl(num_tasks=5, r=2, num_up_projections=4, target_modules=["q_proj", "down_proj"])
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.mtllora_A["default"].shape == (2, 64)
    assert q.mtllora_B["default"].shape == (4, 64, 2)
    assert q.task_lambdas("default").shape == (5, 2, 2)
    assert q.task_logits("default").shape == (5, 4)
    assert torch.equal(q.task_lambdas("default"), torch.eye(2).expand(5, 2, 2))
    assert not q.mtllora_B["default"].any()
    per_layer = lambda i, o: 2 * i + 4 * o * 2 + 5 * 4 + 5 * 4  # noqa: E731
    count = 2 * (per_layer(64, 64) + per_layer(96, 64))
    assert model.get_nb_trainable_parameters()[0] == count
    model.print_trainable_parameters()
    assert f"trainable params: {count:,d} ||" in capsys.readouterr().out


def test_task_ids_reach_the_tuner_through_peft_forward():
    model = perturb(mtl())
    assert isinstance(model, PeftModelForCausalLM)
    assert model.base_model.routes_task_ids is True
    input_ids, mask = batch()
    with torch.no_grad():
        direct = model.base_model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits
        routed = model.base_model(input_ids=input_ids, attention_mask=mask, **{ROUTED_TASK_IDS_KWARG: TASKS}).logits
        inner = model.base_model.model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits
    assert torch.equal(direct, logits(model, TASKS))
    assert torch.equal(routed, direct) and torch.equal(inner, direct)
    out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS)
    assert torch.isfinite(out.loss) and torch.equal(out.logits, direct)


def test_beam_search_and_return_sequences_expand_task_ids():
    model = perturb(mtl())
    input_ids, mask = batch()
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    together = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **kwargs)
    assert together.shape[0] == 6
    for i, task in enumerate(TASKS.tolist()):
        one = dict(input_ids=input_ids[i : i + 1], attention_mask=mask[i : i + 1], task_ids=[task])
        alone = model.generate(**one, **kwargs)
        assert torch.equal(together[2 * i : 2 * i + 2], alone), f"example {i} (task {task}) differs"


def test_training_step_reaches_every_parameter_and_only_the_used_tasks():
    model = perturb(mtl(num_tasks=4))
    model.train()
    input_ids, mask = batch()
    model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS).loss.backward()
    params = adapter_params(model)
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    for name, p in params.items():
        if ".mtllora_lambda." in name or ".mtllora_logits." in name:
            assert p.grad[:3].flatten(1).abs().sum(1).gt(0).all(), f"{name}: a routed task got no gradient"
            assert not p.grad[3].any(), f"{name}: task 3 is not in the batch"
    assert all(p.grad is None for n, p in model.named_parameters() if ".mtllora_" not in n), "base stays frozen"


def test_gradient_checkpointing_matches_plain_gradients():
    input_ids, mask = batch()
    grads = []
    for checkpointing in (False, True):
        model = perturb(mtl())
        model.train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapter_params(model).items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_add_set_delete_adapter():
    model = perturb(mtl())
    expected = logits(model, TASKS)
    model.add_adapter("second", mtl_config(num_tasks=2, r=2, target_modules=["q_proj"]))
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    assert torch.equal(logits(model, TASKS), expected)
    model.set_adapter("second")
    assert all(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    assert torch.equal(logits(model, torch.tensor([0, 1, 1])), logits(tiny_model()))  # untrained: the base model
    with pytest.raises(ValueError, match=r"Unknown task id\(s\) \[2\]; valid tasks are ids 0\.\.1"):
        logits(model, TASKS)
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.base_model.set_adapter(["default", "second"])
    state = get_peft_model_state_dict(model, adapter_name="second")
    assert all(".second" not in k for k in state) and len(state) == 2 * 4  # 2 q_proj layers x A, B, Lambda, logits
    model.set_adapter("default")
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    assert torch.equal(logits(model, TASKS), expected)


def test_inference_mode_survives_disable_adapter(tmp_path):
    perturb(mtl()).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    with loaded.disable_adapter():
        pass
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in adapter_params(trainable).values())


# ------------------------------------------------------------------ save, load, export


def test_saved_files_and_config(tmp_path):
    model = perturb(named(r=2, num_up_projections=2, temperature=0.5, target_modules=["q_proj", "c_attn"]))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MTLLORA" and saved["task_names"] == NAMES and saved["num_tasks"] == 3
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is MTLLoraConfig and config.temperature == 0.5 and config.num_up_projections == 2
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    assert set(tensors) == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.mtllora_{n}"
        for i in (0, 1)
        for n in ("A", "B", "lambda", "logits")
    }
    assert tensors[f"{stem}.mtllora_lambda"].shape == (3, 2, 2)
    assert tensors[f"{stem}.mtllora_logits"].shape == (3, 2)
    card = (tmp_path / "README.md").read_text()
    assert "mtl-lora" in card and "`a`, `b`, `c`" in card


def test_auto_peft_model_from_local_base(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="sdpa").eval()
    model = perturb(named(base))
    expected = logits(model, TASKS)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded.base_model, MTLLoraModel)
    assert torch.equal(logits(loaded, ["a", "c", "b"]), expected)


# ------------------------------------------------------------------ merging


def test_merge_adapter_serves_only_the_merged_task():
    model = perturb(named())
    expected = logits(model, ["b"] * 3)
    other = logits(model, TASKS)
    model.base_model.merge_adapter(task=1)
    torch.testing.assert_close(logits(model, ["b"] * 3), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"Task 'b' is merged into the base weights.*unmerge_adapter\(\)"):
        logits(model, TASKS)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits(model, TASKS), other, rtol=1e-4, atol=1e-5)
    model.base_model.merge_adapter(task="c")
    with model.disable_adapter():  # disabling unmerges: the base model again
        torch.testing.assert_close(logits(model), logits(tiny_model()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model, TASKS), other, rtol=1e-4, atol=1e-5)


def test_merging_another_task_over_a_merged_one_is_refused_and_set_adapter_forgets_the_merge():
    model = perturb(named())
    first = logits(model, ["a"] * 3)
    other = logits(model, TASKS)
    model.base_model.merge_adapter(task="a")
    with pytest.raises(ValueError, match=r"already have another task merged in \(\{'default': 0\}\); call unmerge"):
        model.base_model.merge_adapter(task="c")
    torch.testing.assert_close(logits(model, ["a"] * 3), first, rtol=1e-4, atol=1e-5)  # still task a, served
    with pytest.warns(UserWarning):  # PEFT unmerges a merged model when an adapter is set
        model.base_model.set_adapter("default")
    torch.testing.assert_close(logits(model, TASKS), other, rtol=1e-4, atol=1e-5)  # every task again


def test_new_tasks_in_freeze_mode_leave_modules_to_save_alone():
    """modules_to_save copies are shared by every task: the new_tasks stage must not train them."""
    model = perturb(named(modules_to_save=["lm_head"]))
    old = logits(model, TASKS)
    model.add_tasks(["new"])
    model.set_adapter("default")  # PEFT makes the adapter's modules_to_save trainable again here
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if "modules_to_save" in n or "lm_head" in n], trainable
    ids, mask = batch()
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=["new"] * 3).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    torch.testing.assert_close(logits(model, TASKS), old, rtol=0, atol=0)


def test_merge_and_unload_of_a_single_task_adapter_needs_no_task():
    model = perturb(mtl(num_tasks=1))
    expected = logits(model)
    torch.testing.assert_close(logits(model.merge_and_unload()), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_tasks=None), r"MTLLoraConfig needs tasks: pass num_tasks=<int >= 1> or task_names"),
        (dict(num_tasks=0), r"MTLLoraConfig\.num_tasks must be >= 1 \(got 0\)"),
        (dict(num_tasks=None, task_names=["a", "a"]), r"task_names has duplicates \['a'\]"),
        (dict(r=0), r"MTLLoraConfig\.r must be an int >= 1 \(got 0\)"),
        (dict(num_up_projections=0), r"num_up_projections must be an int >= 1 \(got 0\)"),
        (dict(temperature=0.0), r"temperature must be > 0 \(got 0\.0\)"),
        (dict(temperature=-1.0), r"temperature must be > 0 \(got -1\.0\)"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\) \(got 1\.0\)"),
        (dict(layers_pattern="layers"), r"layers_pattern only applies together with layers_to_transform"),
    ],
    ids=[
        "no-tasks",
        "zero-tasks",
        "duplicate-names",
        "r-zero",
        "k-zero",
        "tau-zero",
        "tau-negative",
        "dropout",
        "pattern-alone",
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mtl_config(**kwargs)


def test_merge_errors():
    model = perturb(named())
    with pytest.raises(ValueError, match=r"has 3 tasks \(\['a', 'b', 'c'\]\) .*pass task=<id or name>"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=r"merging adapter 'default': Unknown task name 'x'"):
        model.merge_and_unload(task="x")
    with pytest.raises(ValueError, match=r"merge one task"):
        model.merge_and_unload(task=["a", "b"])
    assert any(isinstance(m, MTLLoraLayer) for m in model.modules()), "nothing was unloaded"
    assert torch.equal(logits(model, TASKS), logits(perturb(named()), TASKS))


def test_loading_into_a_model_of_another_shape(tmp_path):
    perturb(mtl()).save_pretrained(tmp_path)
    config = MTLLoraConfig.from_pretrained(tmp_path)
    config.num_tasks = 2
    with pytest.raises(ValueError, match=re.escape("tasks (num_tasks / task_names): 3 in the file, 2 here")):
        PeftModel.from_pretrained(tiny_model(), tmp_path, config=config)
    message = (
        r"input features of the adapted layer: \d+ in the file, \d+ here\)\. Load or resume it into a model built with"
    )
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_model(hidden_size=32, intermediate_size=48), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors[next(k for k in tensors if k.endswith("mtllora_logits"))]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensor.*incomplete or corrupt"):
        PeftModel.from_pretrained(tiny_model(), tmp_path)


def test_unsupported_target_module_rolls_back():
    model = tiny_model()
    with pytest.raises(TypeError, match="adapts torch.nn.Linear and transformers Conv1D layers, not Embedding"):
        get_peft_model(model, mtl_config(target_modules=["q_proj", "embed_tokens"]))
    assert not any(isinstance(m, MTLLoraLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert "task_ids" not in str(model.forward.__doc__ or "") and "forward" not in model.__dict__
    assert "generate" not in model.__dict__


# ------------------------------------------------------------------ Trainer


def test_trainer_learns_two_tasks_with_identical_inputs(tmp_path):
    """Both tasks share every prompt and differ only in the answer: right for both only if task ids reach the layers."""
    from datasets import Dataset
    from talora_text import ids, tiny_tokenizer
    from transformers import Trainer, TrainingArguments

    from peft_talora.training.collator import tokenize_for_causal_lm

    tasks, answers, prompts = ["first", "second"], ["A", "B"], [f"question w{i}" for i in range(4)]
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(), mtl_config(num_tasks=None, task_names=tasks, target_modules=None))
    rows = [(p, answers[t], t) for t in range(2) for p in prompts]
    raw = Dataset.from_dict({k: list(v) for k, v in zip(("prompt", "completion", "task_ids"), zip(*rows))})
    data = tokenize_for_causal_lm(raw, tiny_tokenizer(), padding="longest", add_eos=False)
    args = cpu_training_args(TrainingArguments, tmp_path, learning_rate=0.05, max_steps=30)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    input_ids = torch.tensor([ids(*p.split()) for p in prompts])
    for task, answer in zip(tasks, answers):
        predicted = logits(model, [task] * len(prompts), input_ids, torch.ones_like(input_ids))[:, -1].argmax(-1)
        assert predicted.tolist() == ids(answer) * len(prompts), f"task {task!r}"
