"""INT8 weight-only, symmetric, one scale per output channel (as in LLM.int8's weight path / torchao int8wo).

The scale of each row is chosen by error search rather than plain absmax: a row's largest weight
sets the step for all its others, so clipping that one weight slightly (scale = f * absmax / 127,
f searched over `CLIP_FACTORS`) usually lowers the row's total squared error. This is the
"clip search" of AWQ / llama.cpp's quantizers, applied per row; f = 1 (absmax) is among the
candidates, so the result is never worse than absmax on the weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLinear, dtype_key

try:  # the GPU kernels; CPU-only installs may lack Triton
    from . import triton_gemv
except ImportError:
    triton_gemv = None


# Fractions of each row's absmax tried as the clipping point (1.0 = plain absmax).
CLIP_FACTORS = tuple(1.0 - 0.01 * i for i in range(31))


def quantize_int8(w: torch.Tensor, clip_factors: tuple[float, ...] = CLIP_FACTORS,
                  rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q int8 [N,K], scale float32 [N]) with w ≈ q * scale[:, None], each row's scale
    the candidate in `clip_factors` * absmax / 127 with the least squared error."""
    qs, scales = [], []
    for wc in w.split(rows_per_chunk):  # bounds the temporary memory on large layers
        wc = wc.float()
        amax = wc.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        best_scale, best_err = None, None
        for f in clip_factors:
            s = amax * (f / 127.0)
            err = ((torch.round(wc / s).clamp(-127, 127) * s - wc) ** 2).sum(1, keepdim=True)
            if best_err is None:
                best_scale, best_err = s, err
            else:
                better = err < best_err
                best_scale, best_err = torch.where(better, s, best_scale), torch.minimum(err, best_err)
        qs.append(torch.round(wc / best_scale).clamp(-127, 127).to(torch.int8))
        scales.append(best_scale[:, 0])
    return torch.cat(qs), torch.cat(scales)


class Int8Linear(QuantLinear):
    """y = x (q * s)^T. Kernels: the Triton kernel of triton_gemv.py (CUDA), torch._weight_int8pack_mm
    (CPU, bf16 activations fast) or dequantize+matmul; picked per device/dtype/batch by measurement."""

    method = "int8"

    def __init__(self, linear: nn.Linear, codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``codes``: (q int8 [N, K], scale float32 [N]) of a checkpoint already in this form (GPTQ 8-bit,
        compressed-tensors int-quantized) instead of quantizing ``linear.weight``."""
        super().__init__(linear)
        q, scale = codes if codes is not None else quantize_int8(linear.weight.detach())
        self.register_buffer("qweight", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self._scale_cache: dict[torch.dtype, torch.Tensor] = {}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def _scales(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._scale_cache.get(dtype)
        if s is None or s.device != self.scale.device:
            s = self._scale_cache[dtype] = self.scale.to(dtype)
        return s

    def _packed(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(dtype), self.qweight, self._scales(dtype))

    def _dequant(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype if x.dtype != torch.float32 or x.device.type != "cpu" else torch.float32
        return F.linear(x.to(dt), self.qweight.to(dt)) * self._scales(dt)

    def _candidates(self, x: torch.Tensor) -> dict:
        cands = {}
        if x.device.type == "cuda" and triton_gemv is not None and x.dtype in (torch.bfloat16, torch.float16):
            # listed first: the one taken if a shape is first seen inside a CUDA-graph capture (kernels.choose)
            cands["triton_w8"] = lambda x: triton_gemv.w8_matmul(x, self.qweight, self.scale)
        return cands | {
            "int8pack_bf16": lambda x: self._packed(x, torch.bfloat16),
            "int8pack_native": lambda x: self._packed(x, x.dtype),
            "dequant_matmul": self._dequant,
        }

    def _choice_key(self, x: torch.Tensor, bucket: int) -> tuple:
        return ("int8", x.device.type, dtype_key(x), self.out_features, self.in_features, bucket)
