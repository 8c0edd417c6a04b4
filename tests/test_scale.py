"""TA-LoRA and MTL-LoRA where large models are trained: FSDP2, offloaded bases, quantized bases.

- FSDP2 (``fully_shard`` on every decoder layer, then on the PEFT model), 2 CPU processes with gloo
  (``tests/scale_fsdp.py`` under ``torchrun``): the same losses, adapter gradients and trained adapter as
  one process on the same global batch, for both methods; the adapter saved from the sharded run (full
  state dict gathered from the shards) reloads in one process with the FSDP model's outputs.
- Offloaded bases: decoder layers and ``lm_head`` on ``"disk"`` (``from_pretrained(device_map=...,
  offload_folder=...)``) and a whole model offloaded with ``accelerate.cpu_offload``: every weight sits
  on the meta device until its module runs. TA-LoRA on them trains and generates exactly like the plain
  model with the same adapter values. With a GPU, the same with layers split between ``cuda:0`` and
  ``cpu``.
- Quantized bases: a torchao int8 weight-only base quantized by transformers (``TorchAoConfig``), in
  float32 and bfloat16: exact at init, trains, generates, and the prefix is computed in the compute dtype.

What was checked where, and what is known beyond these tests: ``docs/scale.md``.
"""

import os
import shutil
import socket
import subprocess
import sys

import accelerate
import pytest
import torch
from conftest import batch, tiny_model
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peft_talora.talora.attention as attention
from peft_talora import TALoraConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = torch.tensor([0, 2, 1])
GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)


def talora_config():
    return TALoraConfig(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4)


def perturb(peft_model, seed=0, scale=0.3):
    """Stand-in for training: the same random values for every trainable parameter (gates open, tasks distinct)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return peft_model


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ FSDP2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    command = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(HERE, "scale_fsdp.py"),
    ]
    result = subprocess.run([*command, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.mark.parametrize("method", ["talora", "mtllora"])
def test_fsdp2_two_processes_train_like_one(fsdp_run, method):
    run = torch.load(fsdp_run / f"{method}.pt")
    assert run["sharded"], "fully_shard did not turn the parameters into DTensors"
    # the same loss at every step (mean over the ranks' halves of the global batch)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(run["reference_losses"]), rtol=1e-6, atol=1e-6)
    assert run["losses"][-1] < run["losses"][0]
    # the same adapter gradients (FSDP's reduce-scatter averages the ranks' gradients) at the first step ...
    assert set(run["grads"]) == set(run["reference_grads"]) and run["grads"]
    for name, grad in run["grads"].items():
        assert run["reference_grads"][name].abs().max() > 0, name
        torch.testing.assert_close(grad, run["reference_grads"][name], rtol=1e-5, atol=1e-7, msg=name)
    # ... and the same adapter after three AdamW steps
    for name, value in run["trained"].items():
        torch.testing.assert_close(value, run["reference_trained"][name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("method", ["talora", "mtllora"])
def test_fsdp2_saved_adapter_reloads_in_one_process(fsdp_run, method):
    run = torch.load(fsdp_run / f"{method}.pt")
    model = PeftModel.from_pretrained(tiny_model("llama", "sdpa", seed=0), str(fsdp_run / f"{method}_adapter"))
    probe = torch.randint(3, 128, (4, 5), generator=torch.Generator().manual_seed(8))  # scale_fsdp.probe_batch
    with torch.no_grad():
        reloaded = model(input_ids=probe, task_ids=torch.tensor([0, 1, 2, 1])).logits
        with model.disable_adapter():
            base = model(input_ids=probe).logits
    assert (reloaded - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(reloaded, run["fsdp_logits"], rtol=1e-5, atol=1e-5)
    saved = {n: p for n, p in model.named_parameters() if "talora_banks" in n or "mtllora_" in n}
    for name, value in run["trained"].items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------ offloaded bases


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(folder)
    return folder


DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}


#: transformers 5.25 turns hub kernels on by default, and ``model.train()`` then kernelizes, which raises
#: "Unsupported device type 'meta'" on an offloaded model, with or without an adapter (docs/scale.md).
NO_KERNELS = {"use_kernels": False}


def disk_offloaded(folder, tmp_path):
    return AutoModelForCausalLM.from_pretrained(
        folder, device_map=DISK_MAP, offload_folder=str(tmp_path / "offload"), **NO_KERNELS
    )


def cpu_offloaded(folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder, **NO_KERNELS)
    return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))


def train_steps(model, input_ids, mask, steps=3):
    """Losses of ``steps`` AdamW steps on a mixed-task batch, and the first step's gradients."""
    model.train()
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=1e-2)
    losses, first = [], None
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS).loss
        loss.backward()
        losses.append(loss.item())
        if first is None:
            first = {n: p.grad.detach().cpu().clone() for n, p in trainable(model).items()}
        optimizer.step()
        optimizer.zero_grad()
    return losses, first


@pytest.mark.parametrize("offload", [disk_offloaded, cpu_offloaded], ids=["disk", "cpu_offload"])
def test_talora_on_offloaded_base_equals_plain_model(saved_tiny, tmp_path, offload):
    plain = perturb(get_peft_model(AutoModelForCausalLM.from_pretrained(saved_tiny), talora_config()))
    base = offload(saved_tiny, tmp_path)
    assert any(p.device.type == "meta" for p in base.parameters())  # weights appear only inside each forward
    offloaded = perturb(get_peft_model(base, talora_config()))
    assert {p.device.type for p in trainable(offloaded).values()} == {"cpu"}  # the bank is on the execution device
    input_ids, mask = batch(3, 7, left_pad=2)

    with torch.no_grad():
        torch.testing.assert_close(
            offloaded(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits,
            plain(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits,
            rtol=0,
            atol=0,
        )
    losses, grads = train_steps(offloaded, input_ids, mask)
    plain_losses, plain_grads = train_steps(plain, input_ids, mask)
    assert losses == plain_losses and losses[-1] < losses[0]
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)

    offloaded.eval()
    plain.eval()
    generated = offloaded.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **GREEDY)
    assert torch.equal(generated, plain.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **GREEDY))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to split layers between cuda:0 and cpu")
def test_talora_on_base_split_between_cuda_and_cpu(saved_tiny):
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.norm": 0,
        "lm_head": "cpu",
    }
    split_base = AutoModelForCausalLM.from_pretrained(saved_tiny, device_map=device_map, **NO_KERNELS)
    split = perturb(get_peft_model(split_base, talora_config()))
    plain = perturb(get_peft_model(AutoModelForCausalLM.from_pretrained(saved_tiny), talora_config()))
    assert {p.device for p in trainable(split).values()} == {torch.device("cuda", 0)}
    input_ids, mask = batch(3, 7, left_pad=2)
    with torch.no_grad():
        got = split(input_ids=input_ids.cuda(), attention_mask=mask.cuda(), task_ids=TASKS).logits.cpu()
        want = plain(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    losses, grads = train_steps(split, input_ids.cuda(), mask.cuda())
    plain_losses, plain_grads = train_steps(plain, input_ids, mask)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-4)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    split.eval()
    plain.eval()
    generated = split.generate(input_ids=input_ids.cuda(), attention_mask=mask.cuda(), task_ids=TASKS, **GREEDY)
    expected = plain.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **GREEDY)
    assert torch.equal(generated.cpu(), expected)


# ------------------------------------------------------------------ quantized bases


@pytest.fixture
def prefix_dtypes(monkeypatch):
    """The (query, prefix key, prefix value) dtypes of every gated prefix attention call."""
    seen = []
    original = attention.gated_prefix_attention

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(attention, "gated_prefix_attention", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_talora_on_torchao_int8_weight_only_base(saved_tiny, dtype, prefix_dtypes):
    from torchao.quantization import Int8WeightOnlyConfig  # in the test extra: pip install -e .[test]
    from transformers import TorchAoConfig

    base = AutoModelForCausalLM.from_pretrained(
        saved_tiny, dtype=dtype, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    weight = base.model.layers[0].self_attn.k_proj.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)  # really quantized
    input_ids, mask = batch(3, 7, left_pad=2)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids, attention_mask=mask).logits
    model = get_peft_model(base, talora_config())
    with torch.no_grad():  # exact at init: the gates start at zero
        assert torch.equal(model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits, base_logits)
    assert {p.dtype for p in trainable(model).values()} == {torch.float32}  # the adapter trains in float32

    model.train()
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    # the prefix is computed and attended in the compute dtype of the quantized base
    assert prefix_dtypes and set(prefix_dtypes) == {(dtype, dtype, dtype)}

    model.eval()
    generated = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **GREEDY)
    with torch.no_grad():
        adapted = model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits
    assert generated.shape == (3, 7 + GREEDY["max_new_tokens"])
    assert torch.equal(generated[:, 7], adapted[:, -1].argmax(-1))  # the first new token is the adapted model's
    assert not torch.equal(adapted, base_logits)  # training moved the outputs
