"""Adapter precision on a half-precision base, as in PEFT: float32 adapter weights by default,
the base's dtype with ``autocast_adapter_dtype=False`` (``get_peft_model``, ``PeftModel.from_pretrained``).

bf16 on CPU; forward, backward and generate for both methods and both settings.
"""

import copy

import pytest
import torch
from conftest import batch, perturb, tiny_model
from peft import PeftModel, get_peft_model

from peft_talora import MTLLoraConfig, TALoraConfig

TASKS = ["sst2", "trec", "boolq"]
ROUTES = ["boolq", "sst2", "trec"]


def adapter_config(method):
    if method == "ta-lora":
        return TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=4, r=4)
    return MTLLoraConfig(task_type="CAUSAL_LM", task_names=TASKS, r=4, lora_dropout=0.0, target_modules="all-linear")


def moved(model, method):
    """Every adapter parameter away from its initialisation, so that the adapter changes the outputs."""
    if method == "ta-lora":
        return perturb(model, scale=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mtllora_" in name:
                p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))
    return model


def adapter_dtypes(model):
    return {p.dtype for n, p in model.named_parameters() if "talora_" in n or "mtllora_" in n}


def base_dtypes(model):
    return {p.dtype for n, p in model.named_parameters() if "talora_" not in n and "mtllora_" not in n}


CASES = [
    pytest.param("ta-lora", True, id="ta-lora-autocast"),
    pytest.param("ta-lora", False, id="ta-lora-base-dtype"),
    pytest.param("mtl-lora", True, id="mtl-lora-autocast"),
    pytest.param("mtl-lora", False, id="mtl-lora-base-dtype"),
]


@pytest.mark.parametrize("method, autocast", CASES)
def test_adapter_dtype_on_a_bf16_base(tmp_path, method, autocast):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model().to(torch.bfloat16), adapter_config(method), autocast_adapter_dtype=autocast)
    model = moved(model, method).eval()
    assert base_dtypes(model) == {torch.bfloat16}
    assert adapter_dtypes(model) == {torch.float32 if autocast else torch.bfloat16}

    # forward: bf16 logits, close to the same adapter computed entirely in float32
    input_ids, mask = batch(left_pad=2)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, task_ids=ROUTES).logits
        reference = copy.deepcopy(model).float()(input_ids=input_ids, attention_mask=mask, task_ids=ROUTES).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16
    real = mask.bool()  # relative norms over the real (not padded) positions
    size = reference[real].norm()
    assert (out.float() - reference)[real].norm() / size < 0.08  # bf16 rounding
    assert (out.float() - base.float())[real].norm() / size > 0.5  # while the adapter moves the logits much more

    # backward: every adapter parameter gets a finite, nonzero gradient of its own dtype
    model.train()
    model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=ROUTES).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("talora_" in n or "mtllora_" in n for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name

    # generate: per-example tasks; the first step's scores are the forward's last logits
    model.eval()
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        task_ids=ROUTES,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert generated.sequences.shape == (3, input_ids.shape[1] + 4)
    first = generated.scores[0]
    assert torch.equal(first.argmax(-1), out[:, -1].argmax(-1)) and torch.isfinite(first).all()

    # loading follows the same setting
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(
        tiny_model().to(torch.bfloat16), tmp_path / "adapter", autocast_adapter_dtype=autocast
    )
    assert adapter_dtypes(loaded) == adapter_dtypes(model) and base_dtypes(loaded) == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids, attention_mask=mask, task_ids=ROUTES).logits, out)


def test_gpt2_upcast_attention_keeps_its_upcast_path_under_ta_lora():
    """GPT-2 with ``reorder_and_upcast_attn`` computes eager attention scores in float32 (its own branch);
    a TA-LoRA adapter at initialisation (gates closed) leaves a bf16 model's logits bit-identical."""
    base = tiny_model("gpt2", attn="eager", reorder_and_upcast_attn=True).to(torch.bfloat16)
    input_ids, mask = batch(left_pad=2)
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=mask).logits
    model = get_peft_model(base, adapter_config("ta-lora"))
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=mask, task_ids=ROUTES).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["ta-lora", "mtl-lora"])
def test_bf16_autocast_on_a_float32_model(method):
    """Mixed precision the way ``Trainer(bf16=True)`` runs it: float32 weights, the forward under
    ``torch.autocast`` (bf16 on CPU). A fresh adapter is the base model under the same autocast, bit for bit;
    a moved one stays close to its float32 result; float32 gradients reach every adapter parameter."""
    torch.manual_seed(0)
    input_ids, mask = batch(left_pad=2)
    model = get_peft_model(tiny_model(), adapter_config(method)).eval()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        fresh = model(input_ids=input_ids, attention_mask=mask, task_ids=ROUTES).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids, attention_mask=mask).logits
    assert torch.equal(fresh, base)

    model = moved(model, method)
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=mask, task_ids=ROUTES).logits  # float32
        with autocast:
            out = model(input_ids=input_ids, attention_mask=mask, task_ids=ROUTES).logits
    real = mask.bool()
    size = reference[real].norm()
    assert (out.float() - reference)[real].norm() / size < 0.08  # bf16 rounding
    assert (reference - base.float())[real].norm() / size > 0.5  # while the adapter moves the logits much more

    model.train()
    with autocast:
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=ROUTES).loss
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
