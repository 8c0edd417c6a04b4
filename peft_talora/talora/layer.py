"""The trainable parameters of one TA-LoRA adapter and the gated prefix attention they feed.

Shapes (``L`` adapted layers, ``T`` tasks, ``n`` virtual tokens, ``d`` hidden size, ``r`` rank,
``H`` attention heads):

- ``shared_prompt``  ``theta0``  ``(L, n, d)``  slow, shared by all tasks
- ``shared_basis``   ``B``       ``(L, n, r)``  slow, shared by all tasks
- ``task_u``         ``u``       ``(L, T, r)``  fast, one row per task
- ``task_v``         ``v``       ``(L, T, d)``  fast, one row per task
- ``task_gate``      ``c``       ``(L, T)``     fast, one gate scale per task
- ``gate``           ``g``       ``(L, H)``     zero-init, one per head

Task ``t``'s prompt at layer ``l`` is ``theta0[l] + s * B[l] @ outer(u[l, t], v[l, t])`` and its
prefix enters the layer with the gate ``c[l, t] * tanh(g[l])``. The tasks an adapter is created
with start at ``c = 1`` (the method of the paper, where ``g = 0`` alone keeps the base model at
the start); a task added later can start at ``c = 0``, which makes its output exactly the base
model's whatever the trained shared prompt and gates hold. The parameters of all layers are
stacked so that one batched op builds every layer's prompt.

The task factors are kept in blocks, one per ``add_tasks`` call (``task_u_blocks[i]`` of shape
``(L, T_i, r)``), and read as one ``(L, T, r)`` tensor. Tasks added later are separate
parameters, so training only them (with any optimizer, weight decay included) cannot move a
single bit of the earlier tasks. Saved adapters hold the concatenated ``task_u``/``task_v``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class TALoraPromptBank(nn.Module):
    """All parameters of one adapter; see the module docstring for shapes."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_tasks: int,
        num_virtual_tokens: int,
        hidden_size: int,
        r: int,
        num_heads: int,
        scaling: float,
        prompt_init_std: float = 1.0,
    ):
        super().__init__()
        self.scaling = scaling
        L, T, n, d = num_layers, num_tasks, num_virtual_tokens, hidden_size
        self.shared_prompt = nn.Parameter(torch.randn(L, n, d) * prompt_init_std)
        self.shared_basis = nn.Parameter(torch.randn(L, n, r) / math.sqrt(r))
        self.task_u_blocks = nn.ParameterList()
        self.task_v_blocks = nn.ParameterList()
        self.task_gate_blocks = nn.ParameterList()
        self.add_task_block(T)
        self.gate = nn.Parameter(torch.zeros(L, num_heads))

    def add_task_block(self, num_new_tasks: int, gate_scale: float = 1.0) -> None:
        """Append factors for ``num_new_tasks`` tasks; their prompts start equal to the shared prompt.

        ``gate_scale`` is their ``c``: 1 gives them the shared prompt's prefix, 0 no prefix at all
        (exactly the base model) until training opens it.
        """
        L, _, r = self.shared_basis.shape
        reference = self.shared_prompt
        trainable = reference.requires_grad
        u = torch.randn(L, num_new_tasks, r, device=reference.device).to(reference.dtype) / math.sqrt(r)
        self.task_u_blocks.append(nn.Parameter(u, requires_grad=trainable))
        # v starts at zero (like LoRA's B), so every task's prompt starts at the shared prompt.
        v = torch.zeros(L, num_new_tasks, reference.shape[-1], device=reference.device, dtype=reference.dtype)
        self.task_v_blocks.append(nn.Parameter(v, requires_grad=trainable))
        c = torch.full((L, num_new_tasks), float(gate_scale), device=reference.device, dtype=reference.dtype)
        self.task_gate_blocks.append(nn.Parameter(c, requires_grad=trainable))

    @torch.no_grad()
    def copy_into_last_block(self, sources: list[int]) -> None:
        """Start the tasks of the last block as copies of tasks ``sources`` (one per task of that block).

        Both factors and the gate scale are copied, so the copy's output equals its source's and
        both ``u`` and ``v`` get gradients from the first step (a neutral start has ``v = 0``, so
        ``u`` gets none).
        """
        index = torch.as_tensor(sources, device=self.shared_prompt.device)
        self.task_u_blocks[-1].copy_(self.task_u[:, index])
        self.task_v_blocks[-1].copy_(self.task_v[:, index])
        self.task_gate_blocks[-1].copy_(self.task_gate[:, index])

    @property
    def task_u(self) -> torch.Tensor:
        """``u`` of every task, ``(L, T, r)``."""
        return _concat(self.task_u_blocks)

    @property
    def task_v(self) -> torch.Tensor:
        """``v`` of every task, ``(L, T, d)``."""
        return _concat(self.task_v_blocks)

    @property
    def task_gate(self) -> torch.Tensor:
        """``c`` of every task, ``(L, T)``."""
        return _concat(self.task_gate_blocks)

    def task_gate_scales(self, tasks: torch.Tensor, layer: int) -> torch.Tensor:
        """``c[layer, t]`` of task ids ``(U,)``: ``(U,)``."""
        return _task_rows(self.task_gate_blocks, layer, tasks)

    @property
    def num_tasks(self) -> int:
        return sum(block.shape[1] for block in self.task_u_blocks)

    def task_prompt_factors(self, tasks: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts of task ids ``(U,)`` at bank row ``layer`` as ``shared + coefficients (x) directions``.

        Returns ``shared`` ``(n, d)`` (``theta0``), ``coefficients`` ``(U, n)`` (``s * B @ u``) and
        ``directions`` ``(U, d)`` (``v``): task ``u``'s prompt is
        ``shared + coefficients[u, :, None] * directions[u]``, a rank-1 update of the shared one,
        which lets an affine key/value projection skip building the ``(U, n, d)`` prompts. Each
        layer asks for its own row inside its own forward.
        """
        u = _task_rows(self.task_u_blocks, layer, tasks)  # (U, r)
        v = _task_rows(self.task_v_blocks, layer, tasks)  # (U, d)
        coefficients = self.scaling * u @ self.shared_basis[layer].T  # (U, n)
        return self.shared_prompt[layer], coefficients, v

    def orthogonality_penalty(self) -> torch.Tensor:
        """``sum_l sum_{i != j} ||A_i A_j^T||_F^2`` with ``A_t = outer(u_t, v_t)``: a scalar.

        For rank-1 factors ``A_i A_j^T = (v_i . v_j) u_i u_j^T``, so each term is
        ``(v_i . v_j)^2 ||u_i||^2 ||u_j||^2``; all pairs of all layers in one batched product.
        """
        v_overlap = self.task_v @ self.task_v.transpose(1, 2)  # (L, T, T)
        u_norms = self.task_u.pow(2).sum(-1)  # (L, T)
        terms = v_overlap.pow(2) * u_norms.unsqueeze(2) * u_norms.unsqueeze(1)
        return terms.sum() - terms.diagonal(dim1=1, dim2=2).sum()


def _concat(blocks, dim: int = 1) -> torch.Tensor:
    """The task blocks joined along the task dimension (no copy when there is one block)."""
    return blocks[0] if len(blocks) == 1 else torch.cat(list(blocks), dim=dim)


def _task_rows(blocks, layer: int, tasks: torch.Tensor) -> torch.Tensor:
    """Bank row ``layer`` of task ids ``tasks`` ``(U,)`` across the task blocks: ``(U, ...)``."""
    return _concat([block[layer] for block in blocks], dim=0)[tasks]


def is_fast_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` is per task (``u``, ``v`` or the gate scale ``c``) in a TA-LoRA bank."""
    return any(f".{blocks}." in name for blocks in ("task_u_blocks", "task_v_blocks", "task_gate_blocks"))


def gated_prefix_attention(
    query: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    gate: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    softcap: Optional[float] = None,
    gate_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``c * tanh(g) * softmax(Q K_p^T * scaling) V_p`` per head, laid out like attention outputs.

    query ``(B, H, q, hd)``; prefix key/value ``(B, H_kv, n, hd)`` (grouped-query heads are
    shared as in the base attention); gate ``(H,)``; ``gate_scale`` ``c`` ``(B,)``, each
    example's task gate scale (``None``: 1). Returns ``(B, q, H, hd)``. Every query sees
    every prefix position: the prefix has no position and no mask (in a sliding-window layer too).
    The base attention's ``dropout`` and logit ``softcap`` (Gemma 2: ``c * tanh(scores / c)``) apply
    to the prefix scores as they do to the sequence's.
    """
    if softcap:
        groups = query.shape[1] // prefix_key.shape[1]
        keys, values = prefix_key.repeat_interleave(groups, 1), prefix_value.repeat_interleave(groups, 1)
        scores = softcap * torch.tanh(query @ keys.transpose(-1, -2) * scaling / softcap)  # (B, H, q, n)
        probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(query.dtype), p=dropout, training=dropout > 0)
        out = probs @ values
    else:
        out = F.scaled_dot_product_attention(
            query,
            prefix_key,
            prefix_value,
            scale=scaling,
            dropout_p=dropout,
            enable_gqa=query.shape[1] != prefix_key.shape[1],
        )
    gate = torch.tanh(gate).view(1, -1)  # (1, H)
    if gate_scale is not None:
        gate = gate_scale.view(-1, 1) * gate  # (B, H)
    out = out * gate.to(out.dtype)[:, :, None, None]
    return out.transpose(1, 2)
