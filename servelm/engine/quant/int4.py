"""INT4 weight-only, group-wise asymmetric (min/max per group of `group_size` inputs).

Stored in the form torch's packed int4 kernels read: w = (q - 8) * scale + zero, q in 0..15,
one (scale, zero) pair per group. A Q4_1 GGUF block (w = q*d + m over 32 inputs) is exactly
this with group_size=32, scale=d, zero=m+8d, so quantizing a dequantized Q4_1 model at g=32
gives back its own grid (see `on_int4_grid`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cuda_w4, kernels
from .base import QuantLinear, dtype_key

try:  # the GPU kernels; CPU-only installs may lack Triton
    from . import triton_gemv
except ImportError:
    triton_gemv = None


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (q int32 [N,K] in 0..15, scale [N,K/g], zero [N,K/g]) float32, w ≈ (q-8)*scale+zero."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo + 8.0 * scale


def on_int4_grid(w: torch.Tensor, group_size: int = 32, tol: float = 0.05) -> bool:
    """Returns True when w already sits on a 4-bit min/max grid of `group_size` blocks (e.g. a
    dequantized GGUF Q4_1 tensor): the mean round-trip error is below `tol` of one step."""
    q, scale, zero = quantize_int4(w, group_size)
    n, k = w.shape
    deq = (q.reshape(n, k // group_size, group_size) - 8) * scale[..., None] + zero[..., None]
    err = (deq.reshape(n, k) - w.float()).abs().reshape(n, k // group_size, group_size).mean(-1)
    return bool((err / scale).mean() < tol)


_CUDA_LAYOUTS: dict[tuple, str] = {}


def cuda_layout(n: int, k: int, group_size: int, device: torch.device, max_rows: int = 1,
                dtype: torch.dtype = torch.bfloat16) -> str:
    """Returns the CUDA weight layout of an [n, k] layer: "mma" (the tensor-core kernel of cuda_w4.py),
    "gemv" (the Triton kernels of triton_gemv.py) or "tinygemm" (torch's aten._weight_int4pack_mm),
    timed once per shape on random codes. Each stores the weight differently, so the choice is made per
    layer at load, not per step: it is the layout with the smaller sum of its times at one row and at
    ``min(max_rows, 16)`` rows (the engine passes its ``max_num_seqs``), so a server that batches does
    not pay tinygemm's 2-3x at 16 rows for a few percent at one (docs/quantization.md). "mma" is timed
    where it compiles, the shape fits its tiles and the model is bf16.
    SERVELM_QUANT_KERNEL / kernels.force() set to "cuda_w4", "triton_w4" or "tinygemm" override the
    measurement."""
    forced = kernels.forced()
    if forced == "tinygemm":
        return "tinygemm"
    if forced == "triton_w4" and triton_gemv is not None:
        return "gemv"
    # only now: available() compiles the tensor-core kernel (~0.7 s), which a forced layout does not need
    mma_ok = dtype == torch.bfloat16 and cuda_w4.supports(n, k, group_size) and cuda_w4.available(device)
    if forced == "cuda_w4" and mma_ok:
        return "mma"
    if triton_gemv is None:
        return "tinygemm"
    rows = sorted({1, max(1, min(max_rows, 16))})
    key = (n, k, group_size, str(device), rows[-1], mma_ok)
    if key not in _CUDA_LAYOUTS:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
        sz = (torch.rand(k // group_size, n, 2, device=device) * 0.01).to(torch.bfloat16)
        xs = [torch.randn(m, k, device=device, dtype=torch.bfloat16) for m in rows]

        def total(fn) -> float:
            return sum(kernels.time_kernel(lambda x=x: fn(x), device) for x in xs)

        mine = triton_gemv.pack_int4(q, group_size)
        times = {"gemv": total(lambda x: triton_gemv.w4_matmul(x, mine, sz, group_size))}
        if mma_ok:
            tiles = cuda_w4.pack(q)
            times["mma"] = total(lambda x: cuda_w4.matmul(x, tiles, sz, group_size))
        try:
            theirs = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
            times["tinygemm"] = total(lambda x: torch.ops.aten._weight_int4pack_mm(x, theirs, group_size, sz))
        except (RuntimeError, NotImplementedError):  # tinygemm missing on this build or card
            pass
        _CUDA_LAYOUTS[key] = min(times, key=times.get)
    return _CUDA_LAYOUTS[key]


_CPU_UNPACK: dict[tuple[int, int], torch.Tensor] = {}


def _unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [n, k] codes held by ``packed``, a weight packed by aten._convert_weight_to_int4pack_for_cpu.

    That layout differs by CPU (its blocking follows the vector width torch was dispatched to: AVX-512
    and AVX2 machines pack differently), so it is not written down here but read off the kernel once per
    shape: codes that spell each element's own index, four bits per pack, show where every nibble goes."""
    inv = _CPU_UNPACK.get((n, k))
    if inv is None:
        idx = torch.arange(n * k, dtype=torch.int64)
        src = torch.zeros(n * k, dtype=torch.int64)
        for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
            codes = ((idx >> shift) & 15).to(torch.int32).reshape(n, k)
            src |= _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)).to(torch.int64) << shift
        inv = torch.empty(n * k, dtype=torch.int32)
        inv[src] = torch.arange(n * k, dtype=torch.int32)
        _CPU_UNPACK[(n, k)] = inv
    return _nibbles(packed.cpu())[inv.long()].reshape(n, k).to(packed.device)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit code of a packed uint8 tensor, low nibble then high nibble of each byte, flattened."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(-1)


class Int4Linear(QuantLinear):
    """Kernels: CPU aten._weight_int4pack_mm_for_cpu (bf16 activations); CUDA the tensor-core kernel of
    cuda_w4.py, the Triton kernels of triton_gemv.py or torch's tinygemm aten._weight_int4pack_mm, each
    in its own layout (chosen per layer shape at load by :func:`cuda_layout`); or dequantize+matmul.
    Picked per device/dtype/batch by measurement."""

    method = "int4"

    def __init__(self, linear: nn.Linear, group_size: int, max_rows: int = 1,
                 codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 scale_dtype: torch.dtype = torch.bfloat16) -> None:
        """``max_rows``: the most rows a product will multiply at once (decode batch), for the CUDA layout.
        ``codes``: (q, scale, zero) as :func:`quantize_int4` returns them, for weights already on a 4-bit
        grid (GGUF Q4_0/Q4_1 blocks, GPTQ/AWQ checkpoints) instead of quantizing ``linear.weight``.
        ``scale_dtype``: how the (scale, zero) pairs are held; float32 keeps a checkpoint's fp16 scales
        exact on the CPU (whose kernel reads float32 too). The CUDA kernels read bfloat16 only."""
        super().__init__(linear)
        n, k = self.out_features, self.in_features
        if k % group_size:
            raise ValueError(f"int4 group_size {group_size} does not divide in_features {k} "
                             f"(layer {n}x{k}); pick a group size that divides {k}")
        self.group_size = group_size
        dev = linear.weight.device
        q, scale, zero = codes if codes is not None else quantize_int4(linear.weight.detach(), group_size)
        # [K/g, N, 2] is what both packed kernels take; bf16 is their native scale dtype.
        if dev.type == "cuda":
            scale_dtype = torch.bfloat16
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(scale_dtype)
        self.layout = "plain"
        packed = None
        if dev.type == "cpu" and n % 64 == 0:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.layout = "cpu"
        elif dev.type == "cuda":
            self.layout = cuda_layout(n, k, group_size, dev, max_rows, linear.weight.dtype)
        if self.layout == "mma":
            packed = cuda_w4.pack(q)  # int32 [N/16, K/64, 32, 4], the order the tensor-core lanes read
        elif self.layout == "gemv":
            packed = triton_gemv.pack_int4(q, group_size)  # int32 [K/8, N], the Triton kernels' order
        elif self.layout == "tinygemm":
            try:
                u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).to(dev)
                packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
            except (RuntimeError, NotImplementedError):
                self.layout = "plain"
        if packed is None:
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        self.register_buffer("qweight", packed.to(dev))
        self.register_buffer("scales_zeros", sz.to(dev))

    def _codes(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.layout == "cpu":
            return _unpack_cpu(self.qweight, n, k)
        if self.layout == "gemv":
            return triton_gemv.unpack_int4(self.qweight, self.group_size)
        if self.layout == "mma":
            return cuda_w4.unpack(self.qweight)
        p = self.qweight
        return torch.stack([p & 15, p >> 4], dim=-1).reshape(n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        k, g = self.in_features, self.group_size
        if self.layout == "tinygemm":  # opaque tiled layout: let the kernel multiply by I
            eye = torch.eye(k, dtype=torch.bfloat16, device=self.qweight.device)
            return torch.ops.aten._weight_int4pack_mm(eye, self.qweight, g, self.scales_zeros).t().to(dtype)
        return self._dequant_weight(torch.float32).to(dtype)

    def _dequant_weight(self, dtype: torch.dtype) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        sz = self.scales_zeros.to(dtype).transpose(0, 1)  # [N, K/g, 2]
        q = self._codes().reshape(n, k // g, g).to(dtype) - 8
        return (q * sz[..., 0:1] + sz[..., 1:2]).reshape(n, k)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "tinygemm":  # needs a contiguous A (a column slice of x is not)
            return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight,
                                                      self.group_size, self.scales_zeros)
        return super()._matmul(x)

    def _candidates(self, x: torch.Tensor) -> dict:
        # the functions read the buffers when called: they outlive this call (remembered by _matmul)
        g, cands = self.group_size, {}
        if self.layout == "mma":  # listed first: taken as is if first seen inside a CUDA-graph capture
            cands["cuda_w4"] = lambda x: cuda_w4.matmul(x.to(torch.bfloat16), self.qweight, self.scales_zeros, g)
            cands["cuda_w4_dequant"] = lambda x: F.linear(
                x, cuda_w4.dequantize(self.qweight, self.scales_zeros, g).to(x.dtype))
        if self.layout == "gemv":  # listed first: taken as is if first seen inside a CUDA-graph capture
            cands["triton_w4"] = lambda x: triton_gemv.w4_matmul(x, self.qweight, self.scales_zeros, g)
        if self.layout == "cpu":  # the kernel multiplies in the dtype its scales are held in
            sdt = self.scales_zeros.dtype
            name = "int4pack_bf16" if sdt == torch.bfloat16 else "int4pack_fp32"
            cands[name] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(sdt), self.qweight, g, self.scales_zeros)
        cands["dequant_matmul"] = lambda x: F.linear(x, self._dequant_weight(x.dtype))
        return cands

    def _choice_key(self, x: torch.Tensor, bucket: int) -> tuple:
        return ("int4", self.layout, x.device.type, dtype_key(x), self.out_features, self.in_features,
                self.group_size, bucket)
