"""Bad input gets a clear error: configs, task ids, adapters that do not fit, corrupt files, unsupported models."""

import re
import shutil
import types

import pytest
import torch
from conftest import batch, logits, perturb, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_talora import TALoraConfig

VALID = re.escape("ids 0..2 or names ['x', 'y', 'z']")


def config(**kwargs):
    base = dict(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4)
    return TALoraConfig(**{**base, **kwargs})


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_tasks=None), ValueError, r"needs tasks: pass num_tasks=<int >= 1> or task_names"),
        (dict(num_tasks=0), ValueError, r"num_tasks must be >= 1 \(got 0\)"),
        (dict(num_tasks=-2), ValueError, r"num_tasks must be >= 1 \(got -2\)"),
        (dict(num_tasks=2.5), TypeError, r"num_tasks must be an int >= 1 \(got 2\.5, a float\)"),
        (dict(num_tasks=2.0), TypeError, r"num_tasks must be an int >= 1 \(got 2\.0, a float\)"),
        (dict(num_tasks=True), TypeError, r"num_tasks must be an int >= 1 \(got True, a bool\)"),
        (dict(r=0), ValueError, r"TALoraConfig\.r must be an int >= 1 \(got 0\)"),
        (dict(r=1.5), TypeError, r"TALoraConfig\.r must be an int >= 1 \(got 1\.5, a float\)"),
        (dict(num_virtual_tokens=0), ValueError, r"num_virtual_tokens must be an int >= 1 \(got 0\)"),
        (dict(num_virtual_tokens=2.5), TypeError, r"num_virtual_tokens must be an int >= 1 \(got 2\.5, a float\)"),
        (dict(num_virtual_tokens="10"), TypeError, r"num_virtual_tokens must be an int >= 1 \(got '10', a str\)"),
        (
            dict(num_tasks=None, task_names="trec"),
            TypeError,
            r"task_names must be a list of names, not the string 'trec'"
            r".*task_names=\['trec'\]",
        ),
        (dict(num_tasks=None, task_names=["a", "b", "a"]), ValueError, r"task_names has duplicates \['a'\]"),
        (dict(num_tasks=None, task_names=["a", ""]), ValueError, r"task_names must be non-empty strings"),
        (dict(num_tasks=None, task_names=["a", 2]), TypeError, r"task_names must be non-empty strings.*\['a', 2\]"),
        (dict(num_tasks=None, task_names=[]), ValueError, r"task_names is empty \(got \[\]\); name at least one"),
        (dict(num_tasks=3, task_names=["a", "b"]), ValueError, r"num_tasks=3 disagrees with the 2 task_names"),
        (dict(adapter_layers=[]), ValueError, r"adapter_layers is empty"),
        (dict(adapter_layers=[0, 0]), ValueError, r"adapter_layers has repeated indices: \[0, 0\]"),
        (dict(adapter_layers=[0.7]), TypeError, r"adapter_layers must hold ints.*\[0\.7\]"),
        (dict(adapter_layers=1), TypeError, r"adapter_layers must be a list of layer indices \(got 1\).*\[1\]"),
        (dict(alpha=float("nan")), ValueError, r"alpha must be a finite number > 0 \(got nan\)"),
        (dict(orthogonality_weight=float("nan")), ValueError, r"orthogonality_weight must be a finite number >= 0"),
        (dict(orthogonality_weight=-1.0), ValueError, r"orthogonality_weight must be >= 0 \(got -1\.0\)"),
        (dict(prompt_init_std=float("inf")), ValueError, r"prompt_init_std must be a finite number >= 0 \(got inf\)"),
        (dict(alpha="8"), TypeError, r"alpha must be a number > 0 \(got '8', a str\)"),
        (dict(inference_mode="yes"), TypeError, r"inference_mode must be True or False \(got 'yes'\)"),
    ],
    ids=[
        "no-tasks",
        "zero-tasks",
        "negative-tasks",
        "float-tasks",
        "integral-float-tasks",
        "bool-tasks",
        "r-zero",
        "r-float",
        "no-virtual-tokens",
        "float-virtual-tokens",
        "string-virtual-tokens",
        "names-as-a-string",
        "duplicate-names",
        "empty-name",
        "int-name",
        "empty-names",
        "count-disagrees",
        "empty-layers",
        "repeated-layers",
        "float-layers",
        "int-layers",
        "nan-alpha",
        "nan-orthogonality",
        "negative-orthogonality",
        "inf-init-std",
        "string-alpha",
        "string-inference-mode",
    ],
)
def test_bad_config(kwargs, error, message):
    with pytest.raises(error, match=message):
        config(**kwargs)


def test_config_accepts_numpy_ints_and_ints_for_floats():
    """What JSON or numpy hands over is converted, so the config saves and compares like the plain one."""
    import numpy as np

    plain = config(r=4, alpha=8.0, adapter_layers=[0, -1], task_names=["a", "b", "c"])
    other = config(r=np.int64(4), alpha=8, adapter_layers=(np.int32(0), -1), task_names=("a", "b", "c"))
    assert other.to_dict() == plain.to_dict()
    assert type(other.r) is int and type(other.alpha) is float and type(other.adapter_layers[0]) is int


def test_config_messages_name_the_field():
    """The field a user has to change is named verbatim."""
    cases = [
        (dict(num_tasks=0), "num_tasks"),
        (dict(r=0), "r "),
        (dict(num_tasks=None, task_names=["a", "a"]), "task_names"),
        (dict(num_tasks=2, task_names=["a", "b", "c"]), "task_names"),
        (dict(adapter_layers=[]), "adapter_layers"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValueError) as info:
            config(**kwargs)
        assert field in str(info.value), (kwargs, str(info.value))


def test_adapter_layers_out_of_range_on_the_model():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_model(), config(adapter_layers=[5]))
    message = str(info.value)
    assert "adapter_layers [5] out of range" in message
    assert "2 decoder layers" in message
    assert "[-2, 1]" in message
    with pytest.raises(ValueError, match=r"adapter_layers \[-3\] out of range .* \[-2, 1\]"):
        get_peft_model(tiny_model(), config(adapter_layers=[-3]))
    with pytest.raises(ValueError, match=r"adapter_layers \[1, -1\] name the same layer twice"):
        get_peft_model(tiny_model(), config(adapter_layers=[1, -1]))


# ------------------------------------------------------------------ task ids


@pytest.fixture
def named():
    return perturb(get_peft_model(tiny_model(), config(num_tasks=None, task_names=["x", "y", "z"])))


@pytest.mark.parametrize(
    "task_ids, error, message",
    [
        (None, ValueError, r"3 tasks, so every call needs `task_ids`.* with " + VALID),
        (torch.tensor([0, 7, 1]), ValueError, r"Unknown task id\(s\) \[7\]; valid tasks are " + VALID),
        (7, ValueError, r"Unknown task id\(s\) \[7\]; valid tasks are " + VALID),
        (torch.tensor([-1, 0, 0]), ValueError, r"Unknown task id\(s\) \[-1\]; valid tasks are " + VALID),
        (["x", "w", "y"], ValueError, r"Unknown task name 'w'; valid tasks are " + VALID),
        ("w", ValueError, r"Unknown task name 'w'; valid tasks are " + VALID),
        (torch.tensor([0, 1]), ValueError, r"`task_ids` must have shape \(batch,\) = \(3,\), .*got shape \(2,\)"),
        (
            torch.tensor([[0, 1, 2]]),
            ValueError,
            r"`task_ids` must have shape \(batch,\) = \(3,\), .*got shape \(1, 3\)",
        ),
        (
            torch.tensor([0.0, 1.0, 2.0]),
            TypeError,
            r"integer tensor .* got dtype torch\.float32; valid tasks are " + VALID,
        ),
        ([True, False, True], TypeError, r"got dtype torch\.bool; valid tasks are " + VALID),
        (
            [True, 1, 0],
            TypeError,
            r"`task_ids` holds a bool .*; pass task ids \(ints\) or names: valid tasks are " + VALID,
        ),
        ([torch.tensor(0), torch.tensor(True), 1], TypeError, r"`task_ids` holds a bool"),
        (b"\x00\x01\x02", TypeError, r"`task_ids` must be ints or task names, got bytes; valid tasks are " + VALID),
    ],
    ids=[
        "missing",
        "unknown-id",
        "unknown-scalar",
        "negative",
        "unknown-name",
        "unknown-name-scalar",
        "wrong-length",
        "2d",
        "float",
        "bool",
        "bool-among-ints",
        "bool-tensor-among-ints",
        "bytes",
    ],
)
def test_bad_task_ids_in_forward(named, task_ids, error, message):
    with pytest.raises(error, match=message) as info:
        logits(named, task_ids)
    assert "task" in str(info.value)


@pytest.mark.parametrize(
    "task_ids, error, message",
    [
        (None, ValueError, r"needs `task_ids`.*" + VALID),
        (torch.tensor([0, 7, 1]), ValueError, r"Unknown task id\(s\) \[7\]; valid tasks are " + VALID),
        (torch.tensor([0, -1, 1]), ValueError, r"Unknown task id\(s\) \[-1\]"),
        (["x", "w", "y"], ValueError, r"Unknown task name 'w'; valid tasks are " + VALID),
        (torch.tensor([0, 1]), ValueError, r"shape \(batch,\) = \(3,\).*got shape \(2,\)"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"got dtype torch\.float32; valid tasks are " + VALID),
    ],
    ids=["missing", "unknown-id", "negative", "unknown-name", "wrong-length", "float"],
)
def test_bad_task_ids_in_generate(named, task_ids, error, message):
    input_ids, mask = batch()
    kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(error, match=message):
        named.generate(input_ids=input_ids, attention_mask=mask, task_ids=task_ids, **kwargs)
    # a failed call leaves nothing behind: the next good call works and is deterministic
    good = named.generate(input_ids=input_ids, attention_mask=mask, task_ids=["x", "z", "y"], **kwargs)
    assert good.shape == (3, input_ids.shape[1] + 2)
    assert torch.equal(good, named.generate(input_ids=input_ids, attention_mask=mask, task_ids=[0, 2, 1], **kwargs))


def test_failed_forward_does_not_poison_the_next_call(named):
    ids = torch.tensor([2, 0, 1])
    expected = logits(named, ids)
    for bad in (torch.tensor([0, 9, 1]), None, ["x", "nope", "y"]):
        with pytest.raises(ValueError):
            logits(named, bad)
        assert torch.equal(logits(named, ids), expected)


def test_integer_dtypes_and_names_are_equivalent(named):
    expected = logits(named, torch.tensor([2, 0, 1]))
    assert torch.equal(logits(named, torch.tensor([2, 0, 1], dtype=torch.int32)), expected)
    assert torch.equal(logits(named, ["z", "x", "y"]), expected)
    assert torch.equal(logits(named, [2, "x", 1]), expected)


def test_numpy_ids_and_one_name_for_the_whole_batch(named):
    import numpy as np

    expected = logits(named, torch.tensor([2, 0, 1]))
    assert torch.equal(logits(named, np.array([2, 0, 1])), expected)
    assert torch.equal(logits(named, [np.int64(2), np.int32(0), 1]), expected)
    assert torch.equal(logits(named, np.array(["z", "x", "y"])), expected)
    every = logits(named, torch.tensor([1, 1, 1]))
    assert torch.equal(logits(named, "y"), every)
    assert torch.equal(logits(named, np.int64(1)), every)


def test_empty_batch_of_task_ids():
    from peft_talora.multitask.task_ids import resolve_task_ids

    for empty in ([], (), torch.tensor([], dtype=torch.long), __import__("numpy").array([], dtype=int)):
        ids = resolve_task_ids(empty, batch_size=0, num_tasks=3)
        assert ids.dtype == torch.long and ids.shape == (0,)
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(2,\).*got shape \(0,\)"):
        resolve_task_ids([], batch_size=2, num_tasks=3)


def test_single_task_adapter_needs_no_task_ids():
    model = perturb(get_peft_model(tiny_model(), config(num_tasks=1)))
    without = logits(model)
    assert torch.equal(without, logits(model, torch.zeros(3, dtype=torch.long)))
    assert torch.equal(without, logits(model, 0))
    assert not torch.allclose(without, logits(tiny_model()), atol=1e-3), "the adapter must be in effect"
    with pytest.raises(ValueError, match=r"Unknown task id\(s\) \[1\]; valid tasks are ids 0\.\.0"):
        logits(model, torch.tensor([0, 1, 0]))
    input_ids, mask = batch()
    kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, task_ids=torch.zeros(3, dtype=torch.long)))


# ------------------------------------------------------------------ loading onto the wrong base


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "adapter"
    perturb(get_peft_model(tiny_model(), config())).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "overrides, name, adapter_shape, model_shape, meaning",
    [
        (
            dict(hidden_size=32, intermediate_size=48),
            "shared_prompt",
            (2, 4, 64),
            (2, 4, 32),
            "hidden size of the base model: 64 in the file, 32 here",
        ),
        (dict(num_hidden_layers=3), "gate", (2, 4), (3, 4), "adapted layers (adapter_layers): 2 in the file, 3 here"),
        (
            dict(num_attention_heads=8),
            "gate",
            (2, 4),
            (2, 8),
            "attention heads of the base model: 4 in the file, 8 here",
        ),
    ],
    ids=["hidden-size", "depth", "heads"],
)
def test_adapter_on_a_base_of_another_shape(saved, overrides, name, adapter_shape, model_shape, meaning):
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(tiny_model("llama", **overrides), saved)
    message = str(info.value)
    assert "does not fit this model" in message
    assert f"{name} has shape" in message
    assert meaning in message
    assert str(adapter_shape) in message, message
    assert str(model_shape) in message, message


@pytest.mark.parametrize(
    "base, differences",
    [
        (lambda: tiny_model("llama", num_key_value_heads=4), "num_key_value_heads: 2 in the file, 4 here"),
        (lambda: tiny_model("gpt2"), "model_type: 'llama' in the file, 'gpt2' here"),
    ],
    ids=["kv-heads", "gpt2-of-the-same-width"],
)
def test_adapter_on_a_base_with_the_same_tensor_shapes(saved, base, differences):
    """The prefix projects through the base's own attention, so these bases fit every saved tensor."""
    with pytest.raises(ValueError, match=re.escape(f"was saved from another base model ({differences}")):
        PeftModel.from_pretrained(base(), saved)


def test_adapter_saved_before_base_model_shape_existed_still_loads(saved):
    import json

    config = json.loads((saved / "adapter_config.json").read_text())
    assert config.pop("base_model_shape")["num_key_value_heads"] == 2
    (saved / "adapter_config.json").write_text(json.dumps(config))
    PeftModel.from_pretrained(tiny_model("llama", num_key_value_heads=4), saved)  # nothing to check against


def test_load_adapter_of_another_shape_via_load_adapter(saved):
    model = get_peft_model(tiny_model("llama", num_hidden_layers=3), config())
    with pytest.raises(ValueError, match=re.escape("gate has shape (2, 4) in the file but (3, 4) here")):
        model.load_adapter(saved, adapter_name="other")


@pytest.mark.parametrize(
    "garble",
    [
        lambda data: data[: len(data) // 2],  # truncated tensor data
        lambda data: data[:20],  # truncated header
        lambda data: b"not a safetensors file" * 4,
        lambda data: b"",
    ],
    ids=["truncated-data", "truncated-header", "garbage", "empty"],
)
def test_corrupt_safetensors_file(saved, garble):
    from safetensors import SafetensorError

    file = saved / "adapter_model.safetensors"
    file.write_bytes(garble(file.read_bytes()))
    message = "adapter_model.safetensors is truncated or not a safetensors file"
    with pytest.raises(ValueError, match=message) as info:
        PeftModel.from_pretrained(tiny_model(), saved)
    assert str(saved) in str(info.value) and "save the adapter again" in str(info.value)
    assert isinstance(info.value.__cause__, SafetensorError)  # the original error stays attached


def test_loading_a_hub_adapter_of_other_tasks_into_an_existing_adapter_is_refused(tmp_path, monkeypatch):
    """The same checks as for a local folder (here: the same task count under other names, which the tensor
    shapes cannot tell) run on the adapter config of a Hub repo before anything is loaded."""
    import huggingface_hub

    requested = []

    def download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename, kwargs))
        return str(saved / filename)

    names, saved = ["a", "b", "c"], tmp_path / "adapter"
    get_peft_model(tiny_model(), config(num_tasks=None, task_names=names)).save_pretrained(saved)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = get_peft_model(tiny_model(), config(num_tasks=None, task_names=list(reversed(names))))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=re.escape(f"task_names: {names} in the file, {list(reversed(names))} here")):
        model.load_adapter("someone/adapter", adapter_name="default", revision="v1")
    assert requested == [("someone/adapter", "adapter_config.json", {"revision": "v1"})]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "garble",
    [lambda data: data[: len(data) // 2], lambda data: b"not a weights file" * 10, lambda data: b""],
    ids=["truncated", "garbage", "empty"],
)
def test_corrupt_pytorch_weights_file(tmp_path, garble):
    """``safe_serialization=False`` writes adapter_model.bin: a damaged one gets the same clear error, not
    torch.load's (whose advice to retry with weights_only=False would be unsafe)."""
    model = perturb(get_peft_model(tiny_model(), config()))
    model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    file = tmp_path / "adapter" / "adapter_model.bin"
    file.write_bytes(garble(file.read_bytes()))
    with pytest.raises(ValueError, match="adapter_model.bin is truncated or not a PyTorch weights file") as info:
        PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")
    assert "save the adapter again" in str(info.value) and "weights_only=False" not in str(info.value)


def test_adapter_file_missing_a_tensor(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(saved / "adapter_config.json", broken)
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["base_model.talora_banks.task_v"]
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=re.escape("lacks ['task_v']; it is incomplete or corrupt")):
        PeftModel.from_pretrained(tiny_model(), broken)


def test_adapter_file_with_an_unknown_tensor(saved, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(saved / "adapter_config.json", broken)
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.talora_banks.extra"] = torch.zeros(2)
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'extra' that this model has no place"):
        PeftModel.from_pretrained(tiny_model(), broken)


# ------------------------------------------------------------------ models outside the attention interface


def _manual_attention(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Causal attention written out by hand: never calls transformers' attention interface."""
    b, q, _ = hidden_states.shape
    hd = self.head_dim
    query = self.q_proj(hidden_states).view(b, q, -1, hd).transpose(1, 2)
    key = self.k_proj(hidden_states).view(b, q, -1, hd).transpose(1, 2)
    value = self.v_proj(hidden_states).view(b, q, -1, hd).transpose(1, 2)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ key.transpose(-1, -2)) * hd**-0.5
    scores = scores.masked_fill(~torch.ones(q, q, dtype=torch.bool).tril(), float("-inf"))
    out = (scores.softmax(-1) @ value).transpose(1, 2).reshape(b, q, -1)
    return self.o_proj(out), None


def manual_model(layers=(0, 1)):
    model = tiny_model()
    for i in layers:
        attn = model.model.layers[i].self_attn
        attn.forward = types.MethodType(_manual_attention, attn)
    return model


def assert_untouched(model):
    for layer in model.model.layers:
        assert type(layer.self_attn.config).__name__ == "LlamaConfig"
        assert layer.self_attn.config is model.config
        assert not hasattr(layer.self_attn, "_talora_site")
        assert not layer.self_attn._forward_pre_hooks
    assert not model._forward_pre_hooks, "a forward pre-hook of the failed TA-LoRA model is still on the base model"


@pytest.mark.parametrize("layers, reached", [((0, 1), "0 of 2"), ((1,), "1 of 2")], ids=["all-layers", "one-layer"])
def test_attention_outside_the_interface(layers, reached):
    model = manual_model(layers)
    input_ids, mask = batch()
    before = logits(model, input_ids=input_ids, mask=mask)
    assert not torch.allclose(before, logits(tiny_model(), input_ids=input_ids, mask=mask), atol=1e-3)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, config())
    message = str(info.value)
    assert "attention interface" in message
    assert f"only {reached} decoder layers called it" in message
    if layers == (1,):
        assert "model.layers.0.self_attn" in message
    assert torch.equal(logits(model, input_ids=input_ids, mask=mask), before)
    assert_untouched(model)


def test_decoder_layers_that_drop_keyword_arguments_get_the_clear_error():
    """StableLM's decoder layer calls its attention without the call's keyword arguments, so the routing never
    arrives: the setup probe must end in the count of layers reached, not in the error for a module called
    directly."""
    from transformers import AutoModelForCausalLM, StableLmConfig

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(StableLmConfig(num_hidden_layers=2, **shape))
    with pytest.raises(ValueError, match=r"only 0 of 2 decoder layers called it .* drops keyword arguments"):
        get_peft_model(model, config())
    assert model.config._attn_implementation == "sdpa" and not model._forward_pre_hooks


def test_sparse_attention_that_needs_a_mask_on_the_prompt_replay_is_refused_clearly():
    """DeepSeek-V3.2's top-k indexer reads the attention mask, which the prompt's replay does not have."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                 topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                 head_dim=8, index_topk=2, index_head_dim=16, index_n_heads=2, first_k_dense_replace=1)  # fmt: skip
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v32", **shape))
    with pytest.raises(ValueError, match=r"running its prompt through DeepseekV32Attention .* is not supported"):
        get_peft_model(model, config())
    assert not model._forward_pre_hooks and not hasattr(model.model.layers[0].self_attn, "_talora_site")


# ------------------------------------------------------------------ a failed get_peft_model leaves the base as it was


@pytest.mark.parametrize(
    "make, bad",
    [(manual_model, config()), (tiny_model, config(adapter_layers=[5]))],
    ids=["attention-interface", "adapter-layers"],
)
def test_failed_get_peft_model_leaves_no_patching(make, bad):
    model = make()
    before = logits(model)
    with pytest.raises(ValueError):
        get_peft_model(model, bad)
    assert torch.equal(logits(model), before)
    assert_untouched(model)


@pytest.mark.parametrize(
    "make, bad",
    [(manual_model, config()), (tiny_model, config(adapter_layers=[5]))],
    ids=["attention-interface", "adapter-layers"],
)
def test_failed_get_peft_model_keeps_base_trainable(make, bad):
    model = make()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        get_peft_model(model, bad)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == [], f"{len(frozen)} base parameters were left frozen by the failed get_peft_model"


def test_retry_get_peft_model_after_bad_adapter_layers():
    """Fixing the config and calling get_peft_model again on the same base model must just work."""
    ids = torch.tensor([0, 1, 2])
    expected = logits(perturb(get_peft_model(tiny_model(), config())), ids)
    model = tiny_model()
    with pytest.raises(ValueError, match="adapter_layers"):
        get_peft_model(model, config(adapter_layers=[5]))
    retried = perturb(get_peft_model(model, config()))
    assert torch.equal(logits(retried, ids), expected)


# ------------------------------------------------------------------ adapter names


def test_add_adapter_with_existing_name():
    model = get_peft_model(tiny_model(), config())
    model.add_adapter("second", config(num_tasks=2))
    with pytest.raises(ValueError, match="Adapter with name 'second' already exists"):
        model.add_adapter("second", config(num_tasks=5))
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists"):
        model.add_adapter("default", config())
    # the tuner itself refuses too, with its own message
    with pytest.raises(ValueError, match="Adapter 'second' already exists; pick another name or delete it first"):
        model.base_model.add_adapter("second", config(num_tasks=5))
    assert model.peft_config["second"].num_tasks == 2
    assert model.base_model.talora_banks["second"].num_tasks == 2
    assert set(model.peft_config) == {"default", "second"}


def test_add_adapter_that_does_not_fit_is_rolled_back():
    model = get_peft_model(tiny_model(), config())
    with pytest.raises(ValueError, match=r"adapter_layers \[5\] out of range"):
        model.add_adapter("bad", config(adapter_layers=[5]))
    assert set(model.peft_config) == {"default"}
    assert list(model.base_model.talora_banks) == ["default"]
    model.add_adapter("bad", config(adapter_layers=[1]))  # the name is free again
    assert model.base_model.talora_banks["bad"].gate.shape == (1, 4)


def test_after_deleting_the_active_adapter_the_next_one_trains():
    model = get_peft_model(tiny_model(), config())
    model.add_adapter("b", config())
    model.set_adapter("b")
    model.delete_adapter("b")
    assert model.active_adapter == "default"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("default" in n for n in trainable), trainable


def test_unknown_adapter_names():
    model = get_peft_model(tiny_model(), config())
    with pytest.raises(ValueError, match="Adapter nope not found"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match=r"Adapter 'nope' does not exist; available: \['default'\]"):
        model.base_model.set_adapter("nope")
    with pytest.raises(ValueError, match=r"Adapter 'nope' does not exist; available: \['default'\]"):
        model.base_model.training_stage("nope")
