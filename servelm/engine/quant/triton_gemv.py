"""Triton weight-only matrix products for decode-sized batches: W4A16, W8A16 and plain 16-bit.

    y[M, N] = x[M, K] @ W[N, K]^T, x in bf16/fp16, fp32 accumulation, y in x's dtype.

Weight formats (what :class:`Int4Linear` / :class:`Int8Linear` store on CUDA):
- int4: uint8 ``[N, K/2]`` in *split-group* order: in each group of ``G`` inputs, byte ``j`` holds the code
  of input ``j`` (low nibble) and of input ``j + G/2`` (high nibble). One 16-byte load thus feeds two
  contiguous activation chunks, and neither the weights nor ``x`` need a shuffle. Codes q are 0..15 with
  one (scale, zero) pair per group, stored ``[K/G, N, 2]``: ``w = (q - 8) * scale + zero``.
- int8: int8 ``[N, K]`` and one float scale per row: ``w = q * scale[n]``.
- 16-bit: the weight itself (for unquantized Linears at batch 1, where it measures faster than cuBLAS).

At decode every weight is read once per token, so these kernels are about bytes. Each program owns
``BLOCK_N`` output rows of one of ``SPLIT_K`` slices of K, streams its weight tile once and multiplies it
with up to ``BLOCK_M`` activation rows:
- ``BLOCK_M == 1`` (gemv): multiply and row sums on the CUDA cores. For int4 the per-group scale is
  applied after the group's sum, ``sum_g scale * (sum x*q - 8 sum x) + zero * sum x``, so the inner loop
  is one multiply-add per weight.
- ``BLOCK_M >= 16`` (dot): the tile is dequantized to x's dtype in registers and fed to ``tl.dot``.
Where N alone gives too few programs to fill the GPU (the 4096-wide projections of an 8B model), K is
split and the partial sums are added atomically into a zeroed fp32 buffer that is cast at the end.

Block sizes come from :func:`pick_config`, a table measured with ``bench/gemv.py`` on an H100/H200.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Config(NamedTuple):
    block_m: int  # 1: gemv on CUDA cores; >= 16: tl.dot
    block_n: int  # output rows per program
    block_k: int  # inputs per loop step (int4: a multiple of the group size; the int4 dot path takes one group)
    split_k: int  # slices of K, summed atomically in fp32 when > 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _nibbles_f32(q):
    """uint8 bytes -> (low nibble - 8, high nibble - 8) in float32, without int-to-float conversions
    (quarter rate on the GPU, and the limit of a naive int4 kernel): a code c < 2^23 OR-ed into the
    bits of the float 2^23 (0x4B000000) is the float 2^23 + c exactly."""
    qi = q.to(tl.int32)
    lo = ((qi & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8
    hi = ((qi >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return lo, hi


@triton.jit
def _nibbles_16(q, DTYPE: tl.constexpr):
    """uint8 bytes -> (MAGIC + low nibble, MAGIC + high nibble) in bf16/fp16 for tl.dot, by the same
    trick: c OR-ed into 128.0 (bf16 0x4300, 7 mantissa bits) or 1024.0 (fp16 0x6400) is exact."""
    qi = q.to(tl.int32)
    if DTYPE == tl.bfloat16:
        base = 0x4300
    else:
        base = 0x6400
    lo = ((qi & 15) | base).to(tl.int16).to(DTYPE, bitcast=True)
    hi = ((qi >> 4) | base).to(tl.int16).to(DTYPE, bitcast=True)
    return lo, hi


@triton.jit(do_not_specialize=["M", "split_k"])  # one build for every batch size and split
def _w4_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, split_k,
               GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HALF: tl.constexpr = GROUP // 2
    NG: tl.constexpr = GROUPS_PER_STEP if BLOCK_M == 1 else 1  # the dot path takes one group per step
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    num_groups = K // GROUP
    per_split = tl.cdiv(tl.cdiv(num_groups, split_k), NG) * NG  # this program's groups: whole steps
    g_start = pid_k * per_split  # the last slice may reach past K: masked below
    j = tl.arange(0, HALF)
    sz_rows = sz_ptr + 2 * n
    if BLOCK_M == 1:
        # acc[n] = sum over groups g of scale * sum_g x (q - 8) + zero * sum_g x
        grp = tl.arange(0, NG)
        w_rows = w_ptr + n[:, None, None].to(tl.int64) * stride_wn
        x_row = x_ptr + pid_m * stride_xm
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g0 in range(g_start, g_start + per_split, NG):
            g = g0 + grp
            g_ok = g < num_groups
            q = tl.load(w_rows + (g[None, :, None] * HALF + j[None, None, :]),
                        mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)  # [BLOCK_N, NG, HALF] bytes
            x_off = g[:, None] * GROUP + j[None, :]
            x_lo = tl.load(x_row + x_off, mask=g_ok[:, None], other=0.0).to(tl.float32)  # first half of each group
            x_hi = tl.load(x_row + x_off + HALF, mask=g_ok[:, None], other=0.0).to(tl.float32)
            lo, hi = _nibbles_f32(q)
            xq = tl.sum(lo * x_lo[None] + hi * x_hi[None], axis=2)  # [BLOCK_N, NG]
            xs = tl.sum(x_lo + x_hi, axis=1)[None, :]
            sz_mask = n_ok[:, None] & g_ok[None, :]
            s = tl.load(sz_rows[:, None] + g[None, :] * (2 * N), mask=sz_mask, other=0.0).to(tl.float32)
            z = tl.load(sz_rows[:, None] + g[None, :] * (2 * N) + 1, mask=sz_mask, other=0.0).to(tl.float32)
            acc += tl.sum(s * xq + z * xs, axis=1)
        out = y_ptr + pid_m * stride_ym + n
        if ATOMIC:
            tl.atomic_add(out, acc, mask=n_ok)
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        # Per group, on the tensor cores with the weight tile as the left operand (it fills the 64-row
        # side of Hopper's wgmma and may stay in registers; the few rows of x are the narrow side):
        # d[n, m] = (MAGIC + q) . x, then acc += scale * (d - (MAGIC + 8) * sum x) + zero * sum x.
        DT: tl.constexpr = x_ptr.dtype.element_ty
        MAGIC: tl.constexpr = 128.0 if DT == tl.bfloat16 else 1024.0
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
        x_cols = x_ptr + m[None, :] * stride_xm  # x^T: [HALF, BLOCK_M] tiles
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for g in range(g_start, g_start + per_split):
            g_ok = g < num_groups
            q = tl.load(w_rows + (g * HALF + j[None, :]), mask=n_ok[:, None] & g_ok, other=0)  # [BLOCK_N, HALF]
            x_lo = tl.load(x_cols + (g * GROUP + j[:, None]), mask=m_ok[None, :] & g_ok, other=0.0)
            x_hi = tl.load(x_cols + (g * GROUP + HALF + j[:, None]), mask=m_ok[None, :] & g_ok, other=0.0)
            w_lo, w_hi = _nibbles_16(q, DT)
            d = tl.dot(w_hi, x_hi, tl.dot(w_lo, x_lo))
            xs = (tl.sum(x_lo.to(tl.float32), axis=0) + tl.sum(x_hi.to(tl.float32), axis=0))[None, :]
            s = tl.load(sz_rows + g * (2 * N), mask=n_ok & g_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(sz_rows + g * (2 * N) + 1, mask=n_ok & g_ok, other=0.0).to(tl.float32)[:, None]
            acc += s * (d - (MAGIC + 8.0) * xs) + z * xs
        out = y_ptr + m[None, :] * stride_ym + n[:, None]
        mask = m_ok[None, :] & n_ok[:, None]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "split_k"])
def _w8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, split_k,
               HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               ATOMIC: tl.constexpr):
    """int8 weights with a row scale (HAS_SCALE), or 16-bit weights used as they are."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_start = pid_k * per_split  # the last slice may reach past K: masked below
    kb = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    if BLOCK_M == 1:
        x_row = x_ptr + pid_m * stride_xm
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_start + per_split, BLOCK_K):
            k = k0 + kb
            k_ok = k < K
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
            if HAS_SCALE:  # int8 v: its byte XOR 0x80 is v + 128; OR-ed into 2^23 (see _nibbles_f32)
                wf = ((w.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            else:
                wf = w.to(tl.float32)
            acc += tl.sum(wf * x[None, :], axis=1)
        if HAS_SCALE:
            acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        out = y_ptr + pid_m * stride_ym + n
        if ATOMIC:
            tl.atomic_add(out, acc, mask=n_ok)
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_start + per_split, BLOCK_K):
            k = k0 + kb
            k_ok = k < K
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)  # int8 is exact in bf16/fp16
        if HAS_SCALE:
            acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + m[:, None] * stride_ym + n[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def pick_config(fmt: str, m: int, n: int, k: int, group: int, num_sms: int) -> Config:
    """Block sizes for one product. `fmt` is "int4", "int8" or "w16".

    Batch 1 uses gemv; up to 16 rows one tl.dot tile of 16; more rows (prefill) 64-row tiles.
    K is split until there are about two programs per multiprocessor."""
    if m == 1:
        block_m, block_n = 1, 32 if fmt == "int4" else 16
        block_k = 256 if fmt == "int4" else 512
    elif m <= 16:
        block_m, block_n, block_k = 16, 64, 256 if fmt == "int4" else 128
    else:
        block_m, block_n, block_k = 64, 64, 128 if fmt == "int4" else 64
    if fmt == "int4":  # gemv: whole groups per step; dot: one group per step
        block_k = max(block_k, group) if block_m == 1 else group
    split = 1
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    while m <= 16 and programs * split < 2 * num_sms and k // (block_k * split * 2) >= 2:
        split *= 2
    return Config(block_m, block_n, block_k, split)


def _launch(kernel, x: torch.Tensor, n: int, k: int, cfg: Config, args: tuple, **meta) -> torch.Tensor:
    m = x.shape[0]
    atomic = cfg.split_k > 1
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if atomic else \
        torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k, triton.cdiv(m, cfg.block_m))
    kernel[grid](x, args[0], args[1], y, m, n, k, x.stride(0), args[0].stride(0), y.stride(0), cfg.split_k,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ATOMIC=atomic, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages, **meta)
    return y.to(x.dtype) if atomic else y


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def w4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, group: int,
              cfg: Config | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qweight)^T for split-group int4 (module docstring); returns [M, N] in x.dtype."""
    x = _rows(x)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    cfg = cfg or pick_config("int4", x.shape[0], n, k, group, _num_sms(x.device))
    return _launch(_w4_kernel, x, n, k, cfg, (qweight, scales_zeros), GROUP=group,
                   GROUPS_PER_STEP=cfg.block_k // group)


def w8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, cfg: Config | None = None) -> torch.Tensor:
    """x [M, K] @ (qweight * scale[:, None])^T for int8 [N, K] weights; returns [M, N] in x.dtype."""
    x = _rows(x)
    n, k = qweight.shape
    cfg = cfg or pick_config("int8", x.shape[0], n, k, 0, _num_sms(x.device))
    return _launch(_w8_kernel, x, n, k, cfg, (qweight, scale), HAS_SCALE=True, BLOCK_K=cfg.block_k)


def w16_matmul(x: torch.Tensor, weight: torch.Tensor, cfg: Config | None = None) -> torch.Tensor:
    """x [M, K] @ weight^T for a 16-bit [N, K] weight (no bias); returns [M, N] in x.dtype."""
    x = _rows(x)
    n, k = weight.shape
    cfg = cfg or pick_config("w16", x.shape[0], n, k, 0, _num_sms(x.device))
    return _launch(_w8_kernel, x, n, k, cfg, (weight, weight), HAS_SCALE=False, BLOCK_K=cfg.block_k)


def pack_int4(q: torch.Tensor, group: int) -> torch.Tensor:
    """Codes q [N, K] (0..15) -> uint8 [N, K/2] in split-group order (module docstring)."""
    n, k = q.shape
    v = q.reshape(n, k // group, 2, group // 2).to(torch.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, K/2] -> codes [N, K] (uint8)."""
    n, half_k = packed.shape
    v = packed.reshape(n, half_k * 2 // group, 1, group // 2)
    return torch.cat([v & 15, v >> 4], dim=2).reshape(n, half_k * 2)
