"""Fused Triton kernels for the decoder's small element-wise stages on CUDA.

In eager PyTorch, RMSNorm (float32 upcast, square, mean, rsqrt, two multiplies, casts), rotary
embedding (gathers, casts, halves, concatenations, four multiplies), SiLU-and-multiply and the
residual adds cost about 27 launches per layer; at batch 1 those launches, not the bytes, dominate after the
matrix products. :func:`install_fused_kernels` swaps each for one kernel on a loaded model's
modules (instance ``forward`` overrides: ``llama.py`` stays plain PyTorch, and CPU never sees these).
Each residual add runs inside the next RMSNorm (``add_rms_norm``), and the Triton attention backend rotates
q and k while it stores K/V (``rope_store_kv``), so a layer is 9 launches at decode: 2 norms, 4 matrix
products, RoPE with the K/V store, attention (2 with split contexts) and SiLU-and-multiply.
"""
from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

from servelm.engine.models.llama import MLP, LlamaForCausalLM, RMSNorm, RotaryEmbedding
from servelm.engine.models.moe import SparseMoeBlock


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    y = (x * rstd).to(out_ptr.dtype.element_ty)  # cast before the weight, as the reference does
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * N + offs, (y.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``x`` ([T, N], last dim contiguous); returns a new [T, N] tensor."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n = x2.shape[1]
    block = triton.next_power_of_2(n)
    if x2.shape[0] == 0:
        return out.view(x.shape)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), eps, N=n, BLOCK=block,
                                     num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, stride_x, stride_r, eps, N: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
    s = (x.to(tl.float32) + r.to(tl.float32)).to(r_out_ptr.dtype.element_ty)  # the stream, rounded as x + r is
    tl.store(r_out_ptr + row * N + offs, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(sf * sf, 0) / N + eps)
    y = (sf * rstd).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * N + offs, (y.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(rms_norm(x + residual), x + residual)`` for [T, N] tensors in one kernel (the layer's residual add
    fused into the next norm); both results are new tensors."""
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, residual.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r_out = torch.empty(x2.shape, dtype=residual.dtype, device=x.device)
    n = x2.shape[1]
    block = triton.next_power_of_2(n)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, r_out, x2.stride(0), r2.stride(0), eps, N=n,
                                             BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape), r_out.view(x.shape)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh,
                 stride_kt, stride_kh, v_ptr, v_cache_ptr, slot_ptr, stride_vt, stride_vh,
                 H: tl.constexpr, KVH: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, STORE: tl.constexpr):
    t = tl.program_id(0)
    half: tl.constexpr = D // 2
    pos = tl.load(pos_ptr + t)
    offs_d = tl.arange(0, half)
    cos = tl.load(cos_ptr + pos * D + offs_d)[None, :]  # cos/sin repeat across the two halves
    sin = tl.load(sin_ptr + pos * D + offs_d)[None, :]
    offs_h = tl.arange(0, H_PAD)[:, None]
    qm = offs_h < H
    q1 = tl.load(q_ptr + t * stride_qt + offs_h * stride_qh + offs_d[None, :], mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + t * stride_qt + offs_h * stride_qh + half + offs_d[None, :], mask=qm, other=0.0).to(
        tl.float32)
    qo = q_out_ptr + t * H * D + offs_h * D + offs_d[None, :]
    tl.store(qo, (q1 * cos - q2 * sin).to(q_out_ptr.dtype.element_ty), mask=qm)
    tl.store(qo + half, (q2 * cos + q1 * sin).to(q_out_ptr.dtype.element_ty), mask=qm)
    if STORE:  # k_out is the layer's K cache: rotated K and V go straight to their slot
        slot = tl.load(slot_ptr + t)
        if slot < 0:  # padding rows of a captured CUDA graph write nothing
            return
        row = slot.to(tl.int64) * KVH * D
        vm = offs_h < KVH
        offs_full = tl.arange(0, D)[None, :]
        vals = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_full, mask=vm, other=0.0)
        tl.store(v_cache_ptr + row + offs_h * D + offs_full, vals, mask=vm)
    else:
        row = t * KVH * D
    km = offs_h < KVH
    k1 = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d[None, :], mask=km, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + half + offs_d[None, :], mask=km, other=0.0).to(
        tl.float32)
    ko = k_out_ptr + row + offs_h * D + offs_d[None, :]
    tl.store(ko, (k1 * cos - k2 * sin).to(k_out_ptr.dtype.element_ty), mask=km)
    tl.store(ko + half, (k2 * cos + k1 * sin).to(k_out_ptr.dtype.element_ty), mask=km)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding (rotate-half form) of q [T, H, D] and k [T, KVH, D]; returns new contiguous tensors."""
    T, H, D = q.shape
    kvh = k.shape[1]
    q_out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(T, kvh, D, dtype=k.dtype, device=k.device)
    _launch_rope(positions, q, k, q_out, k_out, cos, sin)
    return q_out, k_out


def rope_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """:func:`rope` of q and k, with rotated k and v written to their cache slots (slot -1 skips) in the
    same kernel, not through a tensor and a second launch; returns the rotated q ([T, H, D])."""
    T, H, D = q.shape
    q_out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if v.stride(2) != 1:
        v = v.contiguous()
    _launch_rope(positions, q, k, q_out, k_cache, cos, sin, v, v_cache, slot_mapping)
    return q_out


def _launch_rope(positions, q, k, q_out, k_out, cos, sin, v=None, v_cache=None, slot_mapping=None) -> None:
    T, H, D = q.shape
    kvh = k.shape[1]
    if not T:
        return
    store = v is not None
    if not store:  # unused pointers
        v, v_cache, slot_mapping = k, k_out, positions
    _rope_kernel[(T,)](q, k, q_out, k_out, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       v, v_cache, slot_mapping, v.stride(0), v.stride(1), H=H, KVH=kvh,
                       H_PAD=triton.next_power_of_2(max(H, kvh)), D=D, STORE=store, num_warps=4)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)  # silu rounds first, as F.silu(gate) * up does
    tl.store(out_ptr + row * N + offs, (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for x = [gate | up] ([T, 2N]); returns [T, N]."""
    T, two_n = x.shape
    n = two_n // 2
    out = torch.empty(T, n, dtype=x.dtype, device=x.device)
    block = 1024
    if T:
        _silu_mul_kernel[(T, triton.cdiv(n, block))](x, out, x.stride(0), N=n, BLOCK=block, num_warps=4)
    return out


def install_fused_kernels(model: LlamaForCausalLM) -> None:
    """Route the model's RMSNorms, rotary embedding and MLP activation through the kernels above.

    Only for a CUDA model in float16/bfloat16; raises ValueError otherwise.
    """
    p = next(model.parameters())
    if p.device.type != "cuda" or p.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("fused kernels need a float16/bfloat16 model on CUDA")
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward = types.MethodType(
                lambda self, x, residual=None: rms_norm(x, self.weight, self.eps) if residual is None
                else add_rms_norm(x, residual, self.weight, self.eps), m)
        elif isinstance(m, RotaryEmbedding) and m.long_after is None:
            # the fused kernels read the full tables themselves: skip the model's per-step cos/sin lookup
            # (longrope's two sets of tables, chosen per sequence, keep the eager lookup)
            m.forward = types.MethodType(lambda self, pos, q, k, cos_sin=None: rope(pos, q, k, self.cos, self.sin), m)
            m.tables = types.MethodType(lambda self, positions, dtype, long_rows=None: None, m)
        elif isinstance(m, SparseMoeBlock):
            from servelm.engine.fused_moe import fused_moe  # noqa: PLC0415

            m.experts = fused_moe  # the block still runs gpt-oss's biased, clamped experts by reference
        elif isinstance(m, MLP):
            m.forward = types.MethodType(lambda self, x: self.down_proj(silu_mul(self.gate_up_proj(x))), m)
