"""Attention backends over the paged KV cache, behind one interface (``base.py``)."""
from __future__ import annotations

import torch

from servelm.engine.attention.base import AttentionBackend, AttentionContext, BatchLayout
from servelm.engine.attention.torch_ref import TorchAttentionBackend


def get_backend(name: str, device: torch.device, dtype: torch.dtype | None = None,
                head_dim: int | None = None) -> AttentionBackend:
    """Return the backend called ``name``; raises ValueError for an unknown name.

    ``auto``: Triton on CUDA when it is installed and runs this cache (float16/bfloat16, a
    power-of-two head_dim >= 16), else the PyTorch reference.
    """
    if name in ("auto", "torch"):
        triton_ok = (dtype in (None, torch.float16, torch.bfloat16)
                     and (head_dim is None or (head_dim >= 16 and head_dim & (head_dim - 1) == 0)))
        if name == "auto" and device.type == "cuda" and triton_ok:
            try:
                from servelm.engine.attention.triton_backend import TritonAttentionBackend
            except ImportError:
                return TorchAttentionBackend()
            return TritonAttentionBackend()
        return TorchAttentionBackend()
    if name == "triton":
        from servelm.engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch or triton")


__all__ = ["AttentionBackend", "AttentionContext", "BatchLayout", "TorchAttentionBackend", "get_backend"]
