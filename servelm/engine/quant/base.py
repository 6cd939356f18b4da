"""What every quantized Linear shares: shape, optional bias, byte count, dequantize()."""
from __future__ import annotations

import torch
from torch import nn


class QuantLinear(nn.Module):
    """Base for weight-only quantized drop-ins for nn.Linear (y = x W^T + b).

    Subclasses store their weight as buffers and implement `dequantize()` and `_matmul(x2d)`."""

    method = "none"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Returns the [out, in] weight this module multiplies by, in `dtype`."""
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_nbytes(self) -> int:
        """Returns bytes held by the quantized weight (codes + scales), bias excluded."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"


def dtype_key(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")
