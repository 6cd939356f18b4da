"""FP8 (e4m3) weights: vLLM's ``quant_method: "fp8"`` checkpoints and compressed-tensors' float-quantized ones.

Checkpoint layout (as vLLM's ``Fp8Config`` reads it): ``weight`` float8_e4m3fn [n, k] with ``weight_scale``
(one float32 per tensor, or [n, 1] per output channel) or, with ``weight_block_size: [128, 128]``,
``weight_scale_inv`` [ceil(n/128), ceil(k/128)] (DeepSeek-V3 style; despite its name ``w = weight * scale``);
``activation_scheme: "static"`` adds an ``input_scale``.

:class:`FP8Linear` keeps the float8 bytes. On a CUDA card with FP8 tensor cores (compute capability 8.9+:
Ada, Hopper) a per-tensor or per-channel weight runs W8A8 through ``torch._scaled_mm`` with dynamic
per-token activation scales (static input scales are not used: per-token scales are at least as
accurate). Elsewhere (the CPU, older cards, 128x128 blocks) it runs weight-only: the weight is upcast to the
activations' dtype for each product, so memory stays at one byte a weight.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantLinear, dtype_key
from .prequantized import FP8Weight, config_error, expand_scale, take

log = logging.getLogger("servelm.engine")

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_logged: set[str] = set()


def fp8_tensor_cores(device: torch.device) -> bool:
    """True on CUDA cards whose tensor cores multiply FP8 (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn x / s, s float32 [m, 1]) with s = each row's absmax / 448 (vLLM's dynamic per-token)."""
    s = (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


class FP8Linear(QuantLinear):
    """y = x (weight * scale)^T with the weight in float8_e4m3fn. Kernels: ``torch._scaled_mm`` W8A8 (CUDA,
    FP8 tensor cores, per-tensor/per-channel scales) or upcast+matmul (weight-only)."""

    method = "fp8"

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, scale: torch.Tensor,
                 block: tuple[int, int] | None = None) -> None:
        """``weight`` float8_e4m3fn [n, k]; ``scale`` float32 [] / [n, 1] / block grid (``block`` its size)."""
        super().__init__(linear)
        dev = linear.weight.device
        self.block = block
        self.register_buffer("weight_fp8", weight.to(dev))
        self.register_buffer("weight_scale", scale.float().to(dev))
        self.w8a8 = block is None and fp8_tensor_cores(dev) and self.in_features % 16 == 0 \
            and self.out_features % 16 == 0
        if self.w8a8:
            why = "W8A8 through torch._scaled_mm with dynamic per-token activation scales"
        elif block is not None and fp8_tensor_cores(dev):
            why = f"weight-only (upcast per product): {block[0]}x{block[1]} block scales have no _scaled_mm path here"
        else:
            why = f"weight-only (W8A16, upcast per product): no FP8 tensor cores on {dev}"
        if why not in _logged:
            _logged.add(why)
            log.info("FP8 weights run %s", why)

    @classmethod
    def from_parts(cls, parts: list[FP8Weight], bias: torch.Tensor | None, dtype: torch.dtype,
                   device: torch.device) -> "FP8Linear | None":
        """q|k|v (or gate|up) as one layer: per-tensor scales of different parts become per-channel (the same
        values); block grids are stacked. Returns None when the parts cannot share one layer exactly: their
        scale layouts differ, or a part's rows are not a whole number of blocks."""
        from .prequantized import _linear_shell

        block = parts[0].block
        if any(p.block != block for p in parts):
            return None
        if block is not None and len(parts) > 1 and any(p.shape[0] % block[0] for p in parts):
            return None
        weight = torch.cat([p.weight for p in parts])
        if block is not None:
            scale = torch.cat([p.scale for p in parts])
        elif len(parts) == 1 and parts[0].scale.dim() == 0:
            scale = parts[0].scale
        else:
            scale = torch.cat([p.scale.reshape(-1, 1).expand(p.shape[0], 1) for p in parts])
        return cls(_linear_shell(weight.shape[0], weight.shape[1], bias, dtype, device), weight, scale, block)

    def describe(self) -> str:
        """How the layer's scales are laid out and how it multiplies, e.g. "fp8 per-channel W8A8"."""
        kind = ("block " + "x".join(map(str, self.block)) if self.block else
                "per-tensor" if self.weight_scale.dim() == 0 else "per-channel")
        return f"fp8 {kind} {'W8A8' if self.w8a8 else 'weight-only'}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.weight_fp8.float() * expand_scale(self.weight_scale, self.weight_fp8.shape, self.block)
        return w.to(dtype)

    def _upcast(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:  # scale after the product: one multiply per output instead of per weight
            y = F.linear(x, self.weight_fp8.to(x.dtype))
            return y * (self.weight_scale.reshape(1, -1) if self.weight_scale.dim() else self.weight_scale).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_per_token(x)
        sw = self.weight_scale.reshape(1, -1).expand(1, self.out_features).contiguous() \
            if self.weight_scale.dim() else self.weight_scale.reshape(1, 1).expand(1, self.out_features).contiguous()
        return torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)

    def _candidates(self, x: torch.Tensor) -> dict:
        cands = {}
        if self.w8a8 and x.is_cuda:  # listed first: taken as is inside a CUDA-graph capture
            cands["fp8_scaled_mm"] = self._scaled_mm
        cands["fp8_upcast"] = self._upcast
        return cands

    def _choice_key(self, x: torch.Tensor, bucket: int) -> tuple:
        return ("fp8", self.block, x.device.type, dtype_key(x), self.out_features, self.in_features, bucket)


class Format:
    """One vLLM fp8 quantization_config; raises :class:`ModelLoadError` naming an unsupported field."""

    def __init__(self, qcfg: dict) -> None:
        scheme = qcfg.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise config_error("activation_scheme", scheme, "dynamic, static")
        blk = qcfg.get("weight_block_size")
        if blk is not None and (not isinstance(blk, list) or len(blk) != 2 or not all(isinstance(b, int) and b > 0
                                                                                        for b in blk)):
            raise config_error("weight_block_size", blk, "null or [rows, cols], e.g. [128, 128]")
        self.block = tuple(blk) if blk else None
        fmt = qcfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise config_error("fmt", fmt, "e4m3")

    def read_linear(self, prefix: str, tensors: dict[str, torch.Tensor]) -> FP8Weight | torch.Tensor:
        """``prefix``'s weight as an FP8Weight (or its float weight when it was left unquantized)."""
        from servelm.engine.models.config import ModelLoadError

        from .prequantized import expect_shape

        w = take(tensors, prefix + ".weight")
        if w.dtype != torch.float8_e4m3fn:
            if prefix + ".weight_scale" in tensors or prefix + ".weight_scale_inv" in tensors:
                raise ModelLoadError(f"tensor {prefix + '.weight'!r} is {w.dtype}, but it has FP8 scales; "
                                     "fp8 checkpoints store float8_e4m3fn weights")
            return w  # a layer left in float (modules_to_not_convert / ignored_layers)
        n, k = w.shape
        input_scale = tensors.pop(prefix + ".input_scale", None)
        if self.block is not None:
            scale = take(tensors, prefix + ".weight_scale_inv")
            expect_shape(prefix + ".weight_scale_inv", scale, (-(-n // self.block[0]), -(-k // self.block[1])),
                         f"weight {[n, k]} in weight_block_size {list(self.block)}")
            return FP8Weight(w, scale.float(), self.block, input_scale)
        scale = take(tensors, prefix + ".weight_scale")
        if scale.numel() == 1:
            return FP8Weight(w, scale.float().reshape(()), None, input_scale)
        if scale.numel() != n:
            raise ModelLoadError(f"tensor {prefix + '.weight_scale'!r} has shape {list(scale.shape)}: neither one "
                                 f"scale nor one per output ({n}); block scales need weight_block_size")
        return FP8Weight(w, scale.float().reshape(n, 1), None, input_scale)
