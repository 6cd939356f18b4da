"""Triton kernels over the paged KV cache: store new K/V, prefill with a cached prefix, split-K decode.

The cache layout is the reference backend's: per layer ``[2, num_blocks, block_size, kv_heads, head_dim]``,
so a token's K (or V) for all its heads is one contiguous run of ``kv_heads * head_dim`` elements at
``slot * kv_heads * head_dim``. Keys are gathered token by token through the block table; a token row
(``head_dim`` elements, 128-256 bytes) is one coalesced load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SPLIT_TOKENS = 64  # context tokens per flash-decoding split: one BLOCK_N step each (short contexts spread over programs)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:  # padding rows of a captured CUDA graph write nothing
        return
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    dst = slot.to(tl.int64) * ROW + offs
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_k + offs, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_v + offs, mask=mask), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v`` ([T, kv_heads, head_dim], rows may be strided) into their cache slots; slot -1 skips."""
    T, kvh, d = k.shape
    row = kvh * d
    if k.stride(2) != 1 or k.stride(1) != d:
        k = k.contiguous()
    if v.stride(2) != 1 or v.stride(1) != d:
        v = v.contiguous()
    _store_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                           ROW=row, ROW_PAD=triton.next_power_of_2(row), num_warps=4 if row >= 512 else 1)


@triton.jit
def _prefill_kernel(q_ptr, o_ptr, k_cache_ptr, v_cache_ptr, table_ptr, q_start_ptr, q_len_ptr, ctx_len_ptr,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_table, scale_log2,
                    KVH: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    mb = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2)
    q_len = tl.load(q_len_ptr + seq)
    if mb * BLOCK_M >= q_len:
        return
    q_start = tl.load(q_start_ptr + seq)
    ctx_len = tl.load(ctx_len_ptr + seq)
    prefix = ctx_len - q_len  # tokens already in the cache before this step's queries
    kvh = h // GROUP
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < q_len
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)
    q_pos = prefix + offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    end = tl.minimum(ctx_len, prefix + (mb + 1) * BLOCK_M)  # causal: later keys are masked for every row
    table = table_ptr + seq * stride_table
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table + offs_n // BS, mask=n_mask, other=0).to(tl.int64)
        row = (block * BS + offs_n % BS) * (KVH * D) + kvh * D
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        keep = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])


def prefill_attention(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor,
                      ctx_lens: torch.Tensor, max_q_len: int, scale: float) -> None:
    """Causal attention of each prefill's queries over its whole context (cached prefix + new), read from the cache.

    ``q``/``out``: [T, heads, head_dim]; ``k_cache``/``v_cache``: [num_blocks, block_size, kv_heads, head_dim].
    """
    _, H, D = q.shape
    _, BS, KVH, _ = k_cache.shape
    n = q_lens.shape[0]
    BLOCK_M = 64 if max_q_len > 32 else 16
    BLOCK_N = 64 if D <= 64 else 32
    grid = (triton.cdiv(max_q_len, BLOCK_M), n, H)
    _prefill_kernel[grid](q, out, k_cache, v_cache, block_tables, q_starts, q_lens, ctx_lens,
                          q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
                          scale * LOG2E, KVH=KVH, GROUP=H // KVH, D=D, BS=BS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                          num_warps=4, num_stages=2)


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, ctx_len_ptr, part_o_ptr, part_lse_ptr,
                         o_ptr, stride_ot, stride_oh, stride_qt, stride_qh, stride_table, scale_log2,
                         H: tl.constexpr, KVH: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                         D: tl.constexpr, BS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                         PART: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(ctx_len_ptr + b)
    # Splits are PART tokens long (longer only past PART * SPLITS tokens), so a sequence's partition,
    # and with it the rounding, does not depend on the grid size: eager and CUDA-graph steps agree.
    split_len = tl.maximum(PART, tl.cdiv(tl.cdiv(ctx_len, SPLITS), BLOCK_N) * BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, ctx_len)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None],
                other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    table = table_ptr + b * stride_table
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table + offs_n // BS, mask=n_mask, other=0).to(tl.int64)
        row = (block * BS + offs_n % BS) * (KVH * D) + kvh * D
        k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SPLITS == 1:  # the whole context in one part: the merge would multiply by exp2(0) = 1, so skip it
        tl.store(o_ptr + b * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=g_mask[:, None])
        return
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))  # log2 domain
    base = (b * H + heads) * SPLITS + split
    tl.store(part_o_ptr + base[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None])
    tl.store(part_lse_ptr + base, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_lse_ptr, ctx_len_ptr, o_ptr, stride_ot, stride_oh,
                          H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                          PART: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx_len = tl.load(ctx_len_ptr + b)
    split_len = tl.maximum(PART, tl.cdiv(tl.cdiv(ctx_len, SPLITS), BLOCK_N) * BLOCK_N)
    n = tl.cdiv(ctx_len, split_len)  # splits that saw keys; merged in order, whatever the grid size
    offs_d = tl.arange(0, D)
    base = (b * H + h) * SPLITS
    m = float("-inf")
    for s in range(0, n):
        m = tl.maximum(m, tl.load(part_lse_ptr + base + s))
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([D], tl.float32)
    w_sum = 0.0
    for s in range(0, n):
        w = tl.exp2(tl.load(part_lse_ptr + base + s) - m)
        acc += w * tl.load(part_o_ptr + (base + s) * D + offs_d)
        w_sum += w
    out = acc / tl.maximum(w_sum, 1e-30)
    tl.store(o_ptr + b * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, ctx_lens: torch.Tensor, num_splits: int, scale: float) -> None:
    """Flash-decoding: one query token per sequence, its context split into ``num_splits`` parts, then merged.

    ``q``/``out``: [B, heads, head_dim]. Every ``ctx_lens`` entry must be >= 1. With one split (contexts up
    to ``SPLIT_TOKENS``) the single kernel writes ``out`` itself: one launch, bitwise the merged result.
    """
    B, H, D = q.shape
    _, BS, KVH, _ = k_cache.shape
    group = H // KVH
    part_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    block_n = 64 if D <= 128 else 32
    _decode_split_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, ctx_lens, part_o, part_lse, out, out.stride(0), out.stride(1),
        q.stride(0), q.stride(1), block_tables.stride(0), scale * LOG2E, H=H, KVH=KVH, GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)), D=D, BS=BS, SPLITS=num_splits, BLOCK_N=block_n,
        PART=SPLIT_TOKENS, num_warps=4, num_stages=2)
    if num_splits == 1:
        return
    _decode_reduce_kernel[(B, H)](part_o, part_lse, ctx_lens, out, out.stride(0), out.stride(1), H=H, D=D,
                                  SPLITS=num_splits, BLOCK_N=block_n, PART=SPLIT_TOKENS, num_warps=1)


def pick_num_splits(max_ctx: int) -> int:
    """Grid size along the context: one split per SPLIT_TOKENS of the longest context, at most 64."""
    return int(max(1, min(-(-max_ctx // SPLIT_TOKENS), 64)))
