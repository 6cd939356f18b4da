"""MXFP4 weights (gpt-oss's experts, ``quant_method: "mxfp4"``): FP4 e2m1 codes, two a byte, in blocks of 32
sharing one power-of-two scale (an e8m0 exponent).

They are dequantized at load to the compute dtype by transformers' own routine (its ``integrations.mxfp4``):
the experts then run as any other model's.
"""
from __future__ import annotations

import logging

import torch

from servelm.engine.models.config import ModelLoadError

log = logging.getLogger("servelm.engine")


def dequantize_mxfp4(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``tensors`` with every ``<name>_blocks``/``<name>_scales`` pair replaced by the float ``<name>`` (in
    ``dtype``, the layout transformers' unquantized gpt-oss keeps: ``gate_up_proj`` ``[E, H, 2I]``,
    ``down_proj`` ``[E, I, H]``). Raises :class:`ModelLoadError` when a pair is incomplete."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = {k: v for k, v in tensors.items() if not k.endswith(("_blocks", "_scales"))}
    names = sorted(k.removesuffix("_blocks") for k in tensors if k.endswith("_blocks"))
    for name in names:
        if name + "_scales" not in tensors:
            raise ModelLoadError(f"MXFP4 weight {name + '_blocks'!r} has no {name + '_scales'!r} in the checkpoint")
        out[name] = convert_moe_packed_tensors(tensors[name + "_blocks"], tensors[name + "_scales"], dtype=dtype)
    log.info("dequantized %d MXFP4 expert tensors to %s", len(names), dtype)
    return out
