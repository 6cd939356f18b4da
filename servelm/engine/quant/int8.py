"""INT8 weight-only, symmetric, one scale per output channel (as in LLM.int8's weight path / torchao int8wo)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .base import QuantLinear, dtype_key


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q int8 [N,K], scale float32 [N]) with w ≈ q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(QuantLinear):
    """y = x (q * s)^T. Kernels: torch._weight_int8pack_mm (CPU, bf16 activations fast) or
    dequantize+matmul; picked per device/dtype/batch by measurement."""

    method = "int8"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        q, scale = quantize_int8(linear.weight.detach())
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

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        cands = {
            "int8pack_bf16": lambda: self._packed(x, torch.bfloat16),
            "int8pack_native": lambda: self._packed(x, x.dtype),
            "dequant_matmul": lambda: self._dequant(x),
        }
        key = ("int8", x.device.type, dtype_key(x), self.out_features, self.in_features, kernels.batch_bucket(x.shape[0]))
        return cands[kernels.choose(key, cands, x.device)]()
