"""The mixture-of-experts MLP on CUDA as two grouped GEMMs over the routed experts (after vLLM's ``fused_moe``).

The (token, slot) pairs of a step are sorted by expert and each expert's group padded to ``BLOCK_M`` rows;
every program of the kernel multiplies one ``BLOCK_M`` group of rows by one expert's weights, so a step reads
each routed expert's matrices once and no other expert's. The first GEMM computes ``[gate; up] = w13[e] @ x``
per pair, the activation runs in between, the second computes ``w2[e] @ h`` with the pair's top-k weight
applied in the kernel; the pairs of a token are then summed in float32, in slot order (as
``moe.moe_reference``, the CPU path, does), so a token's result does not depend on its batch.

The sort runs on the device without a host sync (the launch grid is sized for the worst padding), so the
decode step stays capturable in a CUDA graph. Imported only where Triton and CUDA are present.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 16  # rows per program: tl.dot's smallest tile; a decode token's pair fills one such group


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, weight_ptr, sorted_pairs_ptr, block_expert_ptr, num_padded_ptr,
                         N, K, num_pairs, stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                         A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``c[pair] = (weight[pair] *) a[pair // A_ROW_DIV] @ b[e].T`` for the ``BLOCK_M`` pairs of this program,
    all routed to expert ``e``; padding pairs (``>= num_pairs``) are neither read nor written."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)
    valid = pairs < num_pairs
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + pairs, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """(pair indices sorted by expert, each expert's group padded to ``block_m`` with ``T * k``; the expert of
    each ``block_m`` group; the padded length as a 1-element tensor). No host sync: sizes are worst-case."""
    flat = topk_ids.flatten()
    n = flat.numel()
    max_padded = n + num_experts * (block_m - 1)
    max_padded = -(-max_padded // block_m) * block_m
    # scatter_add, not bincount: bincount reads the largest id back to the host (a sync, no graph capture)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat[order]
    rank = torch.arange(n, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert_sorted]
    dest = (padded_end - padded)[expert_sorted] + rank
    sorted_pairs = torch.full((max_padded,), n, dtype=torch.int32, device=flat.device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, max_padded, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_pairs, block_expert, padded_end[-1:].to(torch.int32)


def _grouped_gemm(a, b, out, weights, sorted_pairs, block_expert, num_padded, a_row_div: int, mul_weight: bool):
    n, k = b.shape[1], b.shape[2]
    block_n = 64 if n >= 64 else triton.next_power_of_2(max(n, 16))
    block_k = 64 if k >= 64 else triton.next_power_of_2(max(k, 16))
    grid = (sorted_pairs.numel() // BLOCK_M, triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](a, b, out, weights, sorted_pairs, block_expert, num_padded, n, k, out.shape[0],
                               a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
                               A_ROW_DIV=a_row_div, MUL_WEIGHT=mul_weight, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                               BLOCK_K=block_k, num_warps=4)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """``moe.moe_reference``'s result (SiLU experts, no biases) from two grouped-GEMM launches: ``[T, H]`` in
    ``x``'s dtype. ``x`` ``[T, H]`` contiguous; ``w13`` ``[E, 2I, H]``, ``w2`` ``[E, H, I]`` on the same device."""
    T, k = topk_ids.shape
    E, two_i, H = w13.shape
    inter = two_i // 2
    x = x.contiguous()
    sorted_pairs, block_expert, num_padded = align_pairs_by_expert(topk_ids, E)
    gate_up = torch.empty(T * k, two_i, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, topk_weights, sorted_pairs, block_expert, num_padded, k, False)
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    out = torch.empty(T * k, H, dtype=x.dtype, device=x.device)
    weights = topk_weights.flatten().to(torch.float32).contiguous()
    _grouped_gemm(h, w2, out, weights, sorted_pairs, block_expert, num_padded, 1, True)
    return out.view(T, k, H).float().sum(dim=1).to(x.dtype)
