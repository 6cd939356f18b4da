"""Triton weight-only matrix products for decode-sized batches: W4A16, W8A16 and plain 16-bit.

    y[M, N] = x[M, K] @ W[N, K]^T, x in bf16/fp16, fp32 accumulation, y in x's dtype.

Weight formats (what :class:`Int4Linear` / :class:`Int8Linear` store on CUDA):
- int4: int32 words ``[K/8, N]``, transposed so that a program's outputs are contiguous (coalesced
  loads, and each thread sums along K by itself, no shuffles). A group of ``G`` inputs is cut into 8
  chunks of ``S = G/8``; word row ``j`` of the group holds, per output, the codes of input ``j`` of every
  chunk (chunk i in bits 4i..4i+3), so one word feeds 8 activations and the x of each chunk is
  contiguous. Codes q are 0..15 with one (scale, zero) pair per group, stored ``[K/G, N, 2]``:
  ``w = (q - 8) * scale + zero``.
- int8: int8 ``[N, K]`` and one float scale per row: ``w = q * scale[n]``.
- 16-bit: the weight itself (``w16_matmul``; measured against cuBLAS by ``bench/gemv.py``, not used by the
  engine: it did not win end to end, docs/gpu.md).

At decode every weight is read once per token, so these kernels are about bytes. Each program owns
``BLOCK_N`` outputs of one of ``SPLIT_K`` slices of K, streams its weight tile once and multiplies it
with up to ``BLOCK_M`` activation rows:
- ``BLOCK_M == 1`` (gemv): multiply and row sums on the CUDA cores. For int4 each code becomes the
  float 1 + q/16 by two integer operations (see ``_nibble_f32``) and the per-group scale is applied
  after the group's sum, so the inner loop is one fused multiply-add per weight.
- ``BLOCK_M >= 16`` (dot): the tile is dequantized to x's dtype in registers and fed to ``tl.dot``.
Where N alone gives too few programs to fill the GPU (the 4096-wide projections of an 8B model), K is
split and the partial sums are added atomically into a zeroed fp32 buffer that is cast at the end.

Block sizes come from :func:`pick_config`, a table measured with ``bench/gemv.py --sweep`` on an H200.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Config(NamedTuple):
    block_m: int  # 1: gemv on CUDA cores; >= 16: tl.dot
    block_n: int  # outputs per program
    block_k: int  # inputs per loop step (int4: a multiple of the group size, >= 128 for the dot path)
    split_k: int  # slices of K, summed atomically in fp32 when > 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _nibble_f32(words, i: tl.constexpr):
    """Nibble i (bits 4i..4i+3) of each int32 word as the float 1 + q/16, exactly, in two integer
    operations and no int-to-float conversion (quarter rate on the GPU, and what limits a naive
    int4 kernel): the nibble shifted into the top mantissa bits (19..22) of 1.0f."""
    SHIFT: tl.constexpr = 19 - 4 * i
    if SHIFT >= 0:
        v = words << SHIFT
    else:
        v = words >> -SHIFT  # arithmetic shift: the sign bits land above bit 22 and are masked off
    return ((v & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _write(ptrs, acc, mask, ATOMIC: tl.constexpr):
    """Store fp32 sums to the output, or add them into the fp32 split-K buffer."""
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _scale_zero(sz_ptr, g, n, N, mask):
    """The (scale, zero) pairs [NG, BLOCK_N] of groups g and outputs n, as fp32."""
    sz = sz_ptr + g[:, None] * (2 * N) + 2 * n[None, :]
    return tl.load(sz, mask=mask, other=0.0).to(tl.float32), tl.load(sz + 1, mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["M", "split_k"])  # one build for every batch size and split
def _w4_kernel(x_ptr, w_ptr, sz_ptr, y_ptr, M, N, K, stride_xm, stride_wr, stride_ym, split_k,
               GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
    """w_ptr: int32 words [K/8, N] (see pack_int4): with S = GROUP/8, word row g*S + j holds, for each
    output n, the codes of inputs g*GROUP + i*S + j, i = 0..7, in bits 4i..4i+3.

    A program owns BLOCK_N outputs (contiguous words: coalesced loads) and walks its slice of K,
    R = GROUPS_PER_STEP * S word rows per step. Per group, with f = 1 + q/16 and T = sum x*f:
    sum x*(q - 8) = 16 T - 24 sum x, so y += 16 scale T + (zero - 24 scale) sum x."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    S: tl.constexpr = GROUP // 8
    NG: tl.constexpr = GROUPS_PER_STEP
    R: tl.constexpr = NG * S
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    num_groups = K // GROUP
    per_split = tl.cdiv(tl.cdiv(num_groups, split_k), NG) * NG  # this program's groups: whole steps
    g_start = pid_k * per_split  # the last slice may reach past K: masked below
    rows = tl.arange(0, R)
    grp = tl.arange(0, NG)
    if BLOCK_M == 1:
        x_row = x_ptr + pid_m * stride_xm
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g0 in range(g_start, g_start + per_split, NG):
            r_ok = g0 + rows // S < num_groups
            words = tl.load(w_ptr + (g0 * S + rows)[:, None].to(tl.int64) * stride_wr + n[None, :],
                            mask=r_ok[:, None] & n_ok[None, :], other=0)  # [R, BLOCK_N]
            x_chunk = x_row + (g0 + rows // S) * GROUP + rows % S  # chunk i: + i*S
            t = tl.zeros([R, BLOCK_N], dtype=tl.float32)
            xs = tl.zeros([R], dtype=tl.float32)
            for i in tl.static_range(8):
                xi = tl.load(x_chunk + i * S, mask=r_ok, other=0.0).to(tl.float32)
                t += _nibble_f32(words, i) * xi[:, None]
                xs += xi
            g = g0 + grp
            s, z = _scale_zero(sz_ptr, g, n, N, (g < num_groups)[:, None] & n_ok[None, :])  # [NG, BLOCK_N]
            t_g = tl.sum(tl.reshape(t, (NG, S, BLOCK_N)), axis=1)
            xs_g = tl.sum(tl.reshape(xs, (NG, S)), axis=1)[:, None]
            acc += tl.sum(16.0 * s * t_g + (z - 24.0 * s) * xs_g, axis=0)
        out = y_ptr + pid_m * stride_ym + n
        _write(out, acc, n_ok, ATOMIC)
    else:
        # Tensor cores: chunk i of the step's groups dequantized in registers,
        # w = 16 scale f + (zero - 24 scale), then x_i [BLOCK_M, R] @ w [R, BLOCK_N].
        DT: tl.constexpr = x_ptr.dtype.element_ty
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g0 in range(g_start, g_start + per_split, NG):
            r_ok = g0 + rows // S < num_groups
            words = tl.load(w_ptr + (g0 * S + rows)[:, None].to(tl.int64) * stride_wr + n[None, :],
                            mask=r_ok[:, None] & n_ok[None, :], other=0)
            g = g0 + grp
            s, z = _scale_zero(sz_ptr, g, n, N, (g < num_groups)[:, None] & n_ok[None, :])  # [NG, BLOCK_N]
            a = tl.reshape(tl.broadcast_to((16.0 * s)[:, None, :], (NG, S, BLOCK_N)), (R, BLOCK_N))
            b = tl.reshape(tl.broadcast_to((z - 24.0 * s)[:, None, :], (NG, S, BLOCK_N)), (R, BLOCK_N))
            x_chunk = x_ptr + m[:, None] * stride_xm + ((g0 + rows // S) * GROUP + rows % S)[None, :]
            x_mask = m_ok[:, None] & r_ok[None, :]
            for i in tl.static_range(8):
                w = (_nibble_f32(words, i) * a + b).to(DT)
                acc = tl.dot(tl.load(x_chunk + i * S, mask=x_mask, other=0.0), w, acc)
        out = y_ptr + m[:, None] * stride_ym + n[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        _write(out, acc, mask, ATOMIC)


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
        _write(out, acc, n_ok, ATOMIC)
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
        _write(out, acc, mask, ATOMIC)


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def pick_config(fmt: str, m: int, n: int, k: int, group: int, num_sms: int) -> Config:
    """Block sizes for one product; `fmt` is "int4", "int8" or "w16". The table is the best of
    ``bench/gemv.py --sweep`` on an H200 for the Llama-3-8B shapes (docs/gpu_runs/gemv_sweep_*.json):
    batch 1 uses gemv, up to 16 rows one 16-row tl.dot tile, more rows (prefill) 64-row tiles."""
    if fmt == "int4":
        groups = k // group
        if m == 1:  # wide column blocks; K split to one group a program (the small layers need the programs)
            cols = triton.cdiv(n, 512 if n > 4096 else 256)
            split = min(groups, 32 if cols < 2 * num_sms else 16)
            return Config(1, 512 if n > 4096 else 256, max(128, group), split, 4, 3 if n >= 16384 else 1)
        if m <= 16:
            return Config(16, 128 if n >= 16384 else 64, max(128, group), min(8, groups), 4, 2)
        return Config(64, 64, max(128, group), 1, 4, 3)
    if m == 1 and fmt == "int8":
        block_n, block_k, warps, stages = (16 if n <= 6144 else 32), 512, 8, 1
    elif m == 1:
        block_n, block_k, warps, stages = 16, (1024 if n <= 4096 else 512), (8 if n < 65536 else 4), 3
    elif m <= 16:
        block_n, block_k, warps, stages = 32, 256, 4, 4
    else:
        block_n, block_k, warps, stages = 64, 64, 4, 3
    split = 1  # split K until there are about two programs per multiprocessor
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, 16)
    while m <= 16 and programs * split < 2 * num_sms and k // (block_k * split * 2) >= 2:
        split *= 2
    return Config(1 if m == 1 else (16 if m <= 16 else 64), block_n, block_k, split, warps, stages)


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
    """x [M, K] @ dequant(qweight)^T for eight-chunk int4 (module docstring); returns [M, N] in x.dtype."""
    x = _rows(x)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
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
    """Codes q [N, K] (0..15) -> int32 words [K/8, N]: with S = group/8, word row g*S + j holds for each
    output the codes of inputs g*group + i*S + j, i = 0..7, in bits 4i..4i+3 (module docstring)."""
    n, k = q.shape
    v = q.reshape(n, k // group, 4, 2, group // 8).to(torch.uint8)  # [n, g, byte b, nibble h, j]: i = 2b + h
    b = v[:, :, :, 0] | (v[:, :, :, 1] << 4)  # [n, g, b, j]
    return b.permute(1, 3, 0, 2).contiguous().view(torch.int32).reshape(k // 8, n)  # little-endian bytes


def unpack_int4(packed: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 words [K/8, N] -> codes [N, K] (uint8)."""
    k8, n = packed.shape
    b = packed.reshape(k8 // (group // 8), group // 8, n).unsqueeze(-1).view(torch.uint8)  # [g, j, n, b]
    b = b.permute(2, 0, 3, 1)  # [n, g, b, j]
    return torch.stack([b & 15, b >> 4], dim=3).reshape(n, k8 * 8)
