"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum, ``quant_method: "gptq"``).

Layout (AutoGPTQ's ``QuantLinear.pack``, the one transformers, vLLM and TGI read), for a layer of
``k`` inputs and ``n`` outputs and ``p = 32 // bits`` codes per int32 word:

- ``qweight`` int32 [k / p, n]: codes packed along the inputs, input ``i*p + j`` at bit ``j * bits`` of row i;
- ``qzeros`` int32 [groups, n / p]: zero points packed along the outputs the same way;
- ``scales`` float16 [groups, n]; ``g_idx`` int32 [k]: the group of each input (``desc_act`` orders it by
  activation size, else it is ``i // group_size``);
- ``w[o, i] = (q[i, o] - z[g_idx[i], o]) * scales[g_idx[i], o]``, where ``checkpoint_format: "gptq"`` (v1, the
  default) stores ``z - 1`` and ``"gptq_v2"`` stores ``z``. ``group_size: -1`` is one group per output channel.
"""
from __future__ import annotations

import torch

from .prequantized import GridWeight, config_error, expect_shape, take, unpack_int32

BITS = (2, 4, 8)


class Format:
    """One GPTQ quantization_config; raises :class:`ModelLoadError` naming an unsupported field."""

    def __init__(self, qcfg: dict) -> None:
        self.bits = qcfg.get("bits", 4)
        if self.bits not in BITS:
            raise config_error("bits", self.bits, ", ".join(map(str, BITS)))
        self.group_size = qcfg.get("group_size", 128)
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise config_error("group_size", self.group_size, "a positive number of inputs, or -1 (per channel)")
        fmt = qcfg.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise config_error("checkpoint_format", fmt, "gptq, gptq_v2")
        self.zero_offset = 1 if fmt == "gptq" else 0  # v1 stores z - 1
        self.modules_in_block_to_quantize = qcfg.get("modules_in_block_to_quantize")

    def read_linear(self, prefix: str, tensors: dict[str, torch.Tensor]) -> GridWeight | torch.Tensor:
        """``prefix``'s weight as a GridWeight (or its float weight when it was left unquantized)."""
        if prefix + ".qweight" not in tensors and prefix + ".weight" in tensors:
            return tensors.pop(prefix + ".weight")
        qweight = take(tensors, prefix + ".qweight")
        qzeros, scales = take(tensors, prefix + ".qzeros"), take(tensors, prefix + ".scales")
        g_idx = tensors.pop(prefix + ".g_idx", None)
        per = 32 // self.bits
        k, n = qweight.shape[0] * per, qweight.shape[1]
        group = k if self.group_size == -1 else self.group_size
        if k % group:
            raise config_error("group_size", self.group_size, f"a divisor of {prefix}'s {k} inputs")
        groups = k // group
        expect_shape(prefix + ".scales", scales, (groups, n), f"qweight {list(qweight.shape)} at group_size {group}")
        expect_shape(prefix + ".qzeros", qzeros, (groups, n // per), f"{self.bits}-bit codes of {n} outputs")
        q = unpack_int32(qweight, self.bits, 0).t().contiguous()  # [n, k]
        zero = (unpack_int32(qzeros, self.bits, 1) + self.zero_offset).t().float()  # [n, groups]
        gi = None
        if g_idx is not None:
            expect_shape(prefix + ".g_idx", g_idx, (k,), f"qweight's {k} inputs")
            gi = g_idx.to(torch.int64)
            if gi.min() < 0 or gi.max() >= groups:
                raise config_error("group_size", self.group_size, f"one that covers {prefix}.g_idx (max {int(gi.max())})")
        return GridWeight(q, scales.float().t().contiguous(), zero.contiguous(), self.bits, group, gi, scales.dtype)
