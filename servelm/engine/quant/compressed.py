"""compressed-tensors checkpoints (llm-compressor, ``quant_method: "compressed-tensors"``).

Layouts (compressed-tensors' ``PackedQuantizationCompressor``, ``NaiveQuantizationCompressor`` and
``FloatQuantizationCompressor``; tests decode the same files with the library itself as reference):

- ``pack-quantized`` (W4A16, W8A16): ``weight_packed`` int32 [n, k * bits / 32], codes ``q + 2**(bits-1)``
  packed along the inputs (element i at bit ``i * bits``), ``weight_shape`` [n, k], ``weight_scale``
  [n, k / group] (group) or [n, 1] (channel), asymmetric ``weight_zero_point`` packed along the outputs the same
  way, ``weight_g_idx`` for activation order; ``w = (q - zero_point) * scale``;
- ``int-quantized`` / ``naive-quantized`` (W8A8 int8): ``weight`` int8, ``weight_scale`` [n, 1], optional
  ``weight_zero_point``; run weight-only here (activations stay in the compute dtype);
- ``float-quantized`` (FP8): ``weight`` float8_e4m3fn, ``weight_scale`` [1] (tensor), [n, 1] (channel) or a block
  grid, optional static ``input_scale``.
"""
from __future__ import annotations

import logging

import torch

from servelm.engine.models.config import ModelLoadError

from .prequantized import FP8Weight, GridWeight, config_error, expect_shape, take, unpack_int32

log = logging.getLogger("servelm.engine")

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "mixed-precision", "dense")
STRATEGIES = ("tensor", "channel", "group", "block")


class Format:
    """One compressed-tensors quantization_config; raises :class:`ModelLoadError` naming an unsupported field."""

    def __init__(self, qcfg: dict) -> None:
        fmt = qcfg.get("format", "dense")
        if fmt not in FORMATS:
            raise config_error("format", fmt, ", ".join(FORMATS))
        status = qcfg.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise config_error("quantization_status", status, "compressed, frozen")
        self.schemes = []
        for gname, group in (qcfg.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            field = f"config_groups.{gname}.weights"
            gfmt = group.get("format") or fmt
            if gfmt not in FORMATS:
                raise config_error(f"config_groups.{gname}.format", gfmt, ", ".join(FORMATS))
            if w.get("type", "int") not in ("int", "float"):
                raise config_error(field + ".type", w.get("type"), "int, float")
            bits = w.get("num_bits", 8)
            if w.get("type", "int") == "int" and bits not in (4, 8):
                raise config_error(field + ".num_bits", bits, "4, 8 (int)")
            if w.get("type") == "float" and bits != 8:
                raise config_error(field + ".num_bits", bits, "8 (float: FP8 e4m3)")
            if w.get("strategy", "tensor") not in STRATEGIES:
                raise config_error(field + ".strategy", w.get("strategy"), ", ".join(STRATEGIES))
            if w.get("dynamic", False):
                raise config_error(field + ".dynamic", w.get("dynamic"), "false (weights are stored quantized)")
            self.schemes.append(w)
        self.bits = {w.get("num_bits", 8) for w in self.schemes}
        self.warned = False

    def read_linear(self, prefix: str, tensors: dict[str, torch.Tensor]) -> GridWeight | FP8Weight | torch.Tensor:
        """``prefix``'s weight as a GridWeight or FP8Weight (or its float weight when it was left unquantized)."""
        if prefix + ".weight_packed" in tensors:
            return self._packed(prefix, tensors)
        w = take(tensors, prefix + ".weight")
        if prefix + ".weight_scale" not in tensors:
            return w  # in the ignore list: a float layer
        scale = take(tensors, prefix + ".weight_scale")
        n, k = w.shape
        if w.dtype == torch.float8_e4m3fn:
            block = None
            if scale.numel() not in (1, n):
                blk = next((s.get("block_structure") for s in self.schemes if s.get("strategy") == "block"), None)
                if not blk:
                    raise ModelLoadError(f"tensor {prefix + '.weight_scale'!r} has shape {list(scale.shape)}: "
                                         "neither one scale, one per output, nor a block grid the config names")
                block = (int(blk[0]), int(blk[1]))
                expect_shape(prefix + ".weight_scale", scale, (-(-n // block[0]), -(-k // block[1])),
                             f"weight {[n, k]} in blocks {list(block)}")
            tensors.pop(prefix + ".weight_zero_point", None)  # symmetric FP8: zero
            return FP8Weight(w, scale.float().reshape(n, 1) if scale.numel() == n else scale.float().reshape(()),
                             block, tensors.pop(prefix + ".input_scale", None))
        if w.dtype != torch.int8:
            raise ModelLoadError(f"tensor {prefix + '.weight'!r} is {w.dtype} next to a weight_scale; "
                                 "compressed-tensors stores int8 or float8_e4m3fn weights")
        if not self.warned:
            log.info("compressed-tensors int8 weights run weight-only: activations stay in the compute dtype")
            self.warned = True
        tensors.pop(prefix + ".input_scale", None)
        tensors.pop(prefix + ".input_zero_point", None)
        zp = tensors.pop(prefix + ".weight_zero_point", None)
        groups = scale.shape[-1] if scale.dim() == 2 else 1
        scale = scale.float().reshape(n, groups) if scale.numel() > 1 else scale.float().reshape(1, 1).expand(n, 1)
        zero = (zp.float().reshape(n, groups) if zp is not None and zp.numel() > 1
                else torch.full((n, groups), float(zp.flatten()[0]) if zp is not None else 0.0))
        # int8 codes -128..127 as 0..255 with the zero point moved by the same 128: the same differences
        q = w.to(torch.int32) + 128
        return GridWeight(q, scale.contiguous(), zero + 128, 8, k // groups, None, torch.float32)

    def _packed(self, prefix: str, tensors: dict[str, torch.Tensor]) -> GridWeight:
        packed = take(tensors, prefix + ".weight_packed")
        shape = take(tensors, prefix + ".weight_shape").tolist()
        scale = take(tensors, prefix + ".weight_scale")
        zp = tensors.pop(prefix + ".weight_zero_point", None)
        g_idx = tensors.pop(prefix + ".weight_g_idx", None)
        n, k = int(shape[0]), int(shape[1])
        bits = packed.shape[1] * 32 // k if k else 0
        if bits not in self.bits or packed.shape[1] * 32 != bits * k:
            raise ModelLoadError(f"tensor {prefix + '.weight_packed'!r} has shape {list(packed.shape)}: "
                                 f"not {sorted(self.bits)}-bit codes of weight_shape {[n, k]} as the config says")
        expect_shape(prefix + ".weight_packed", packed, (n, k * bits // 32), f"weight_shape {[n, k]}")
        groups = scale.shape[-1] if scale.dim() == 2 else 1
        if k % groups:
            raise ModelLoadError(f"tensor {prefix + '.weight_scale'!r} has {groups} groups, which do not divide "
                                 f"the {k} inputs of weight_shape")
        q = unpack_int32(packed, bits, 1)[:, :k].contiguous()
        offset = 1 << (bits - 1)
        if zp is not None:
            zero = unpack_int32(zp, bits, 0)[:n].float()  # packed with the same offset as the codes
            expect_shape(prefix + ".weight_zero_point", zero, (n, groups), "weight_scale's groups")
        else:
            zero = torch.full((n, groups), float(offset))
        gi = g_idx.to(torch.int64) if g_idx is not None else None
        return GridWeight(q, scale.float().reshape(n, groups).contiguous(), zero.contiguous(), bits, k // groups,
                          gi, scale.dtype)
