"""What every quantized Linear shares: shape, optional bias, byte count, dequantize()."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import kernels


class QuantLinear(nn.Module):
    """Base for weight-only quantized drop-ins for nn.Linear (y = x W^T + b).

    Subclasses store their weight as buffers and implement `dequantize()`, `_candidates(x2d)` and
    `_choice_key(x2d, bucket)` (or `_matmul(x2d)` itself)."""

    method = "none"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Returns the [out, in] weight this module multiplies by, in `dtype`."""
        raise NotImplementedError

    def _candidates(self, x: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The kernels that can multiply ``x`` (2-D) by this weight, by name; the first is taken inside a
        CUDA-graph capture if nothing was measured yet."""
        raise NotImplementedError

    def _choice_key(self, x: torch.Tensor, bucket: int) -> tuple:
        """What the fastest kernel depends on: format, layout, device, dtype, shape, batch bucket."""
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T through the kernel :func:`kernels.choose` measured fastest for this layer, x's dtype and
        batch bucket. The answer is remembered on the module, so a decode step pays a dict lookup per
        product instead of rebuilding the candidates (a 135M model runs ~120 products a token)."""
        bucket = kernels.batch_bucket(x.shape[0])
        memo, gen = self.__dict__.get("_memo"), kernels.generation()
        if memo is None or memo[0] != gen:
            memo = self.__dict__["_memo"] = (gen, {})
        hit = memo[1].get((x.device.type, x.dtype, bucket))
        if hit is not None:
            return hit[1](x)
        cands, key = self._candidates(x), self._choice_key(x, bucket)
        name = kernels.choose(key, {n: (lambda f=f: f(x)) for n, f in cands.items()}, x.device)
        if kernels.settled(key, name):
            memo[1][(x.device.type, x.dtype, bucket)] = (name, cands[name])
        return cands[name](x)

    def kernel_for(self, x: torch.Tensor) -> str | None:
        """The kernel this layer settled on for inputs like ``x``, or None before the first product."""
        memo = self.__dict__.get("_memo")
        if memo is None or memo[0] != kernels.generation():
            return None
        hit = memo[1].get((x.device.type, x.dtype, kernels.batch_bucket(x.shape[0])))
        return None if hit is None else hit[0]

    def weight_nbytes(self) -> int:
        """Returns bytes held by the quantized weight (codes + scales), bias excluded."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x if x.dim() == 2 else x.reshape(-1, shape[-1]))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"


def dtype_key(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")
