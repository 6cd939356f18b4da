"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss) in plain PyTorch.

A softmax router picks ``top_k`` experts per token; the experts' weights are stacked
(``w13``: ``[E, 2 * I, H]``, rows [gate; up], and ``w2``: ``[E, H, I]``, the layout of vLLM's
``fused_moe``) so that a GPU kernel can run every routed expert in one launch. On the CPU the
tokens are grouped by expert and each expert that received tokens runs one matmul over its group.

Routing depends only on the token's own hidden state, and a token's expert outputs are summed in
its own top-k order, so its result does not depend on which other tokens share the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from servelm.engine.models.config import ModelConfig


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          softmax_after_topk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 ``[T, top_k]``, expert ids int64 ``[T, top_k]``) of the softmax router, highest first;
    with ``renormalize`` the chosen weights sum to one (Mixtral, Qwen3-MoE's ``norm_topk_prob``); with
    ``softmax_after_topk`` (gpt-oss) the softmax runs over the ``top_k`` largest logits only."""
    if softmax_after_topk:
        logits, ids = torch.topk(router_logits.float(), top_k, dim=-1)
        return torch.softmax(logits, dim=-1), ids
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU, the experts' activation in Mixtral and Qwen-MoE."""
    return F.silu(gate) * up


class ClampedSwiGLU:
    """gpt-oss's activation: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``."""

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = alpha, limit

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                  activation=silu_and_mul) -> torch.Tensor:
    """``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])`` for every token, ``[T, H]`` in ``x``'s dtype,
    with ``expert_e(x) = w2[e] @ activation(gate, up) + b2[e]``, ``[gate; up] = w13[e] @ x + b13[e]`` (the
    biases, gpt-oss's, only where given).

    Tokens are grouped by expert (one stable sort of the flattened ids), each expert with tokens runs
    one matmul over its group, and the per-(token, slot) results are summed over slots in a fixed order."""
    T, k = topk_ids.shape
    inter = w2.shape[2]
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, token order kept
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    rows = torch.empty(T * k, x.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = order[start:start + n]
        start += n
        h = x.index_select(0, idx // k) @ w13[e].t()
        if b13 is not None:
            h = h + b13[e]
        gate, up = h.split(inter, dim=-1)
        y = activation(gate, up) @ w2[e].t()
        rows.index_copy_(0, idx, y if b2 is None else y + b2[e])
    out = rows.view(T, k, -1).float() * topk_weights[..., None].float()
    return out.sum(dim=1).to(x.dtype)


class SparseMoeBlock(nn.Module):
    """The MLP of a mixture-of-experts layer: router, stacked experts and (Qwen2-MoE) a gated shared expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from servelm.engine.models.llama import MLP

        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.softmax_after_topk = cfg.softmax_after_topk
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        self.w13 = nn.Parameter(torch.empty(cfg.num_experts, 2 * cfg.moe_intermediate_size, cfg.hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size),
                               requires_grad=False)
        self.b13 = self.b2 = None
        if cfg.expert_bias:
            self.b13 = nn.Parameter(torch.empty(cfg.num_experts, 2 * cfg.moe_intermediate_size), requires_grad=False)
            self.b2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size), requires_grad=False)
        self.activation = (silu_and_mul if cfg.swiglu_limit is None
                           else ClampedSwiGLU(cfg.swiglu_alpha, cfg.swiglu_limit))
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.experts = moe_reference  # CUDA swaps in the fused Triton kernel (same signature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, self.softmax_after_topk)
        if self.b13 is None and self.activation is silu_and_mul:
            out = self.experts(x, self.w13, self.w2, weights, ids)
        else:  # the fused kernel has no biases and only SiLU: gpt-oss runs the grouped reference
            out = moe_reference(x, self.w13, self.w2, weights, ids, self.b13, self.b2, self.activation)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
