"""FSDP2 worker for tests/test_scale.py: ``torchrun --nproc_per_node 2 tests/scale_fsdp.py OUT_DIR``.

Each rank builds the same tiny Llama with a TA-LoRA (then an MTL-LoRA) adapter whose parameters are
perturbed away from their zero init, and a second, unsharded copy of it. The copy runs one process's
training on the whole global batch; the other copy gets the standard FSDP2 recipe
(``fully_shard`` on every decoder layer, then on the PEFT model) and trains on this rank's half of
the batch. Every row has the same number of target tokens, so the mean of the ranks' losses is the
global loss and FSDP's averaged gradients are the global gradients. Rank 0 writes the numbers to
``OUT_DIR/<method>.pt`` and saves the FSDP adapter (full state dict gathered from the shards) to
``OUT_DIR/<method>_adapter``.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_model  # noqa: E402

from peft_talora import MTLLoraConfig, TALoraConfig  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 4
TASKS = torch.tensor([0, 1, 2, 1])


def global_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 128, (GLOBAL_BATCH, 6), generator=g)


def probe_batch():
    """Inputs on which the reloaded adapter must give the FSDP model's outputs."""
    return torch.randint(3, 128, (GLOBAL_BATCH, 5), generator=torch.Generator().manual_seed(8))


def build(method: str):
    if method == "talora":
        config = TALoraConfig(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4)
    else:
        config = MTLLoraConfig(task_type="CAUSAL_LM", num_tasks=3, r=4, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(tiny_model("llama", "sdpa", seed=0), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: open the gates, distinct tasks, nonzero up-projections
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.train()


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def train(model, input_ids, task_ids, reduce: bool):
    """``STEPS`` AdamW steps; per-step losses (averaged over ranks when ``reduce``) and the first step's gradients."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses, first_grads = [], None
    for _ in range(STEPS):
        loss = model(input_ids=input_ids, labels=input_ids, task_ids=task_ids).loss
        loss.backward()
        value = loss.detach().clone()
        if reduce:
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        losses.append(value.item())
        if first_grads is None:
            first_grads = {n: full(p.grad).detach().clone() for n, p in trainable.items()}
        optimizer.step()
        optimizer.zero_grad()
    return losses, first_grads


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    input_ids = global_batch()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for method in ("talora", "mtllora"):
        reference = build(method)
        sharded = copy.deepcopy(reference)
        ref_losses, ref_grads = train(reference, input_ids, TASKS, reduce=False)

        for layer in sharded.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        losses, grads = train(sharded, input_ids[rows], TASKS[rows], reduce=True)
        is_sharded = all(isinstance(p, DTensor) for p in sharded.parameters())

        trained = {n: full(p.detach()) for n, p in sharded.named_parameters() if p.requires_grad}
        reference_trained = dict(reference.named_parameters())
        gathered = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            sharded.save_pretrained(os.path.join(out_dir, f"{method}_adapter"), state_dict=gathered)
            sharded.eval()
            with torch.no_grad():  # outputs of the FSDP model itself, to compare with the reloaded adapter
                fsdp_logits = sharded(input_ids=probe_batch(), task_ids=TASKS).logits
            torch.save(
                {
                    "losses": losses,
                    "reference_losses": ref_losses,
                    "grads": grads,
                    "reference_grads": ref_grads,
                    "trained": trained,
                    "reference_trained": {n: p.detach() for n, p in reference_trained.items() if n in trained},
                    "sharded": is_sharded,
                    "fsdp_logits": fsdp_logits,
                },
                os.path.join(out_dir, f"{method}.pt"),
            )
        else:
            sharded.eval()
            with torch.no_grad():  # every rank takes part in the all-gathers of rank 0's forward
                sharded(input_ids=probe_batch(), task_ids=TASKS)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
