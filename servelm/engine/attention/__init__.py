"""Attention backends over the paged KV cache, behind one interface (``base.py``)."""
from __future__ import annotations

import torch

from servelm.engine.attention.base import AttentionBackend, AttentionContext, BatchLayout
from servelm.engine.attention.torch_ref import TorchAttentionBackend


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """Return the backend called ``name`` (``auto``: Triton on CUDA when available, else torch)."""
    if name in ("auto", "torch"):
        if name == "auto" and device.type == "cuda":
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
