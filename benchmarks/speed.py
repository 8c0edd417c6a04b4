"""Speed and memory, every figure a ratio of two things measured side by side in one run.

Each comparison runs its variants interleaved (A, B, C, A, B, C, ...) after one warm-up call each
and reports the median of the repeats, so slow phases of a shared machine hit every variant alike.

- training step (forward + backward + AdamW step, one batch of real formatted examples):
  TA-LoRA (mixed-task batch) vs LoRA (r=8, q/v) vs AdaptionPrompt, every position's logits; and
  TA-LoRA's step with the logits at the label positions only (what ``MultiTaskTrainer`` trains with)
  vs every position;
- generation tokens/s (greedy, fixed number of new tokens): TA-LoRA (mixed-task batch) vs the
  base model (and AdaptionPrompt for context), with ``benchmarks/generation.py``'s measurement;
- a TA-LoRA training step on a batch holding 64 distinct tasks vs the same batch all of one task;
- memory: bytes of the tensors autograd saves for backward during one training forward
  (``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, parameter storages
  excluded: the activation memory a training step holds at its peak, before backward), plus
  parameters + gradients + AdamW moments of the trainable weights (4 x 4 bytes each in float32).
  On a CUDA device the peak of ``torch.cuda.max_memory_allocated`` over a step is reported too.
"""

from __future__ import annotations

import copy
import statistics
import time

import generation  # benchmarks/generation.py: tokens_per_second and its prompts
import torch
from peft import AdaptionPromptConfig, LoraConfig, get_peft_model

import peft_talora  # noqa: F401
from peft_talora import MTLLoraConfig, TALoraConfig, talora_optimizer
from peft_talora.training.label_logits import label_positions

NUM_TASKS_BIG = 64


def open_gates(model) -> None:
    """Gates and task factors as after training, so no zero-gate path can be skipped."""
    with torch.no_grad():
        banks = getattr(model.base_model, "talora_banks", None)
        if banks is not None:
            for bank in banks.values():
                bank.gate.fill_(0.1)
                for block in bank.task_v_blocks:
                    block.normal_(std=0.02)
        for name, param in model.named_parameters():
            if "adaption_gate" in name:
                param.fill_(0.1)


def interleaved(calls: dict, repeats: int, warmup: int = 1) -> dict:
    """Seconds per call of every variant: ``warmup`` untimed calls each, then ``repeats`` interleaved rounds."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def _median(times: dict) -> dict:
    return {name: statistics.median(values) for name, values in times.items()}


def train_step_call(model, batch: dict, optimizer):
    def call():
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return call


def adamw(model):
    if hasattr(model.base_model, "talora_banks"):
        return talora_optimizer(model, lr=1e-6)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- memory
def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes autograd keeps for backward after one training forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(**batch)
    del output
    return sum(seen.values())


def trainable_state_bytes(model) -> int:
    """Parameters, gradients and the two AdamW moments of the trainable weights."""
    return sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def cuda_peak_bytes(call) -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def memory(model, batch, optimizer) -> dict:
    out = {
        "saved_activation_bytes": saved_activation_bytes(model, batch),
        "trainable_state_bytes": trainable_state_bytes(model),
    }
    out["total_bytes"] = out["saved_activation_bytes"] + out["trainable_state_bytes"]
    peak = cuda_peak_bytes(train_step_call(model, batch, optimizer))
    if peak is not None:
        out["cuda_step_peak_bytes"] = peak
    return out


# ----------------------------------------------------------------------------- the measurements
#: TA-LoRA's training step with the vocabulary logits at the label positions only (MultiTaskTrainer's default).
LABEL_LOGITS = "ta-lora label logits"


def training_steps(base, batch: dict, task_ids: torch.Tensor, num_tasks: int, repeats: int) -> dict:
    """Step time and memory of TA-LoRA vs LoRA vs AdaptionPrompt on one batch (TA-LoRA: mixed tasks), every
    position's logits as ``model(**batch).loss`` computes them; and TA-LoRA's step with the logits at the label
    positions only (``LABEL_LOGITS``), as :class:`MultiTaskTrainer` trains."""
    layers = base.config.num_hidden_layers
    torch.manual_seed(0)
    models = {
        "ta-lora": get_peft_model(copy.deepcopy(base), TALoraConfig(task_type="CAUSAL_LM", num_tasks=num_tasks)),
        "lora": get_peft_model(
            copy.deepcopy(base),
            LoraConfig(
                task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
            ),
        ),
        "adaption-prompt": get_peft_model(
            copy.deepcopy(base), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=10, adapter_layers=layers)
        ),
        "mtl-lora": get_peft_model(
            copy.deepcopy(base),
            MTLLoraConfig(task_type="CAUSAL_LM", num_tasks=num_tasks, r=8, target_modules=["q_proj", "v_proj"]),
        ),
    }
    device = device_of(base)
    batches = {name: to(batch, device) for name in models}
    batches["ta-lora"]["task_ids"] = task_ids.to(device)
    batches["mtl-lora"]["task_ids"] = task_ids.to(device)
    calls, mem, optimizers = {}, {}, {}
    for name, model in models.items():
        open_gates(model)
        optimizers[name] = optimizer = adamw(model)
        calls[name] = train_step_call(model, batches[name], optimizer)
        mem[name] = memory(model, batches[name], optimizer)
    kept = label_positions(batches["ta-lora"]["labels"])  # what MultiTaskTrainer does by default
    if kept is not None:
        positions, shift_labels = kept
        label_batch = {**batches["ta-lora"], "logits_to_keep": positions, "shift_labels": shift_labels}
        calls[LABEL_LOGITS] = train_step_call(models["ta-lora"], label_batch, optimizers["ta-lora"])
        mem[LABEL_LOGITS] = memory(models["ta-lora"], label_batch, optimizers["ta-lora"])
    times = interleaved(calls, repeats)
    median = _median(times)
    result = {
        "batch_shape": list(batch["input_ids"].shape),
        "median_s": median,
        "runs_s": times,
        "ratios": {
            "ta-lora / lora": median["ta-lora"] / median["lora"],
            "ta-lora / adaption-prompt": median["ta-lora"] / median["adaption-prompt"],
            "mtl-lora / lora": median["mtl-lora"] / median["lora"],
            **({f"{LABEL_LOGITS} / ta-lora": median[LABEL_LOGITS] / median["ta-lora"]} if kept is not None else {}),
        },
        "memory": mem,
        "memory_ratios": {
            "ta-lora / lora": mem["ta-lora"]["total_bytes"] / mem["lora"]["total_bytes"],
            "ta-lora / adaption-prompt": mem["ta-lora"]["total_bytes"] / mem["adaption-prompt"]["total_bytes"],
            "mtl-lora / lora": mem["mtl-lora"]["total_bytes"] / mem["lora"]["total_bytes"],
            **(
                {f"{LABEL_LOGITS} / ta-lora": mem[LABEL_LOGITS]["total_bytes"] / mem["ta-lora"]["total_bytes"]}
                if kept is not None
                else {}
            ),
        },
    }
    del models, calls
    return result


def generation_speed(base, tokenizer, batch_size: int, new_tokens: int, repeats: int, num_tasks: int = 4) -> dict:
    """Generation tokens/s of TA-LoRA (mixed-task batch) and AdaptionPrompt vs the base model, interleaved."""
    layers = base.config.num_hidden_layers
    torch.manual_seed(0)
    talora = get_peft_model(copy.deepcopy(base), TALoraConfig(task_type="CAUSAL_LM", num_tasks=num_tasks))
    adaption = get_peft_model(
        copy.deepcopy(base), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=10, adapter_layers=layers)
    )
    mtl = get_peft_model(
        copy.deepcopy(base),
        MTLLoraConfig(task_type="CAUSAL_LM", num_tasks=num_tasks, r=8, target_modules=["q_proj", "v_proj"]),
    )
    for model in (talora, adaption, mtl):
        open_gates(model)
        model.eval()
    models = {"base": base, "ta-lora": talora, "adaption-prompt": adaption, "mtl-lora": mtl}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in (generation.PROMPTS * batch_size)[:batch_size]
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device_of(base))
    tokenizer.padding_side = side
    common = {"pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    routed = {"task_ids": torch.arange(batch_size) % num_tasks}
    extra = {"base": {}, "ta-lora": routed, "adaption-prompt": {}, "mtl-lora": routed}
    speeds = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        generation.tokens_per_second(model, inputs, 2, {**extra[name], **common})
    for _ in range(repeats):
        for name, model in models.items():
            speeds[name].append(generation.tokens_per_second(model, inputs, new_tokens, {**extra[name], **common}))
    median = {name: statistics.median(v) for name, v in speeds.items()}
    del talora, adaption, mtl
    return {
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "median_tokens_per_s": median,
        "runs_tokens_per_s": speeds,
        "ratios": {
            "ta-lora / base": median["ta-lora"] / median["base"],
            "adaption-prompt / base": median["adaption-prompt"] / median["base"],
            "mtl-lora / base": median["mtl-lora"] / median["base"],
        },
    }


def task_batch(base, tokenizer, seq_len: int, repeats: int, num_tasks: int = NUM_TASKS_BIG) -> dict:
    """TA-LoRA step on a batch of ``num_tasks`` rows holding ``num_tasks`` distinct tasks vs all one task."""
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), TALoraConfig(task_type="CAUSAL_LM", num_tasks=num_tasks))
    open_gates(model)
    optimizer = adamw(model)
    device = device_of(base)
    generator = torch.Generator().manual_seed(0)
    low = min(1000, len(tokenizer) // 2)
    input_ids = torch.randint(low, len(tokenizer), (num_tasks, seq_len), generator=generator)
    plain = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    batches = {
        f"{num_tasks} tasks": to({**plain, "task_ids": torch.arange(num_tasks)}, device),
        "1 task": to({**plain, "task_ids": torch.zeros(num_tasks, dtype=torch.long)}, device),
    }
    calls = {name: train_step_call(model, b, optimizer) for name, b in batches.items()}
    times = interleaved(calls, repeats)
    median = _median(times)
    mem = {name: memory(model, b, optimizer) for name, b in batches.items()}
    many = f"{num_tasks} tasks"
    del model, calls
    return {
        "batch_shape": [num_tasks, seq_len],
        "num_tasks": num_tasks,
        "median_s": median,
        "runs_s": times,
        "ratios": {f"{many} / 1 task": median[many] / median["1 task"]},
        "memory": mem,
        "memory_ratios": {f"{many} / 1 task": mem[many]["total_bytes"] / mem["1 task"]["total_bytes"]},
    }
