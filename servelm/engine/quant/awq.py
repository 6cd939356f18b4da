"""AWQ checkpoints (AutoAWQ / llm-awq, ``quant_method: "awq"``, ``version: "gemm"``).

Layout (AutoAWQ's ``WQLinear_GEMM.from_linear``, also read by transformers and vLLM), ``k`` inputs, ``n`` outputs:

- ``qweight`` int32 [k, n / 8]: 4-bit codes packed along the outputs, word j's nibble i (bits ``4i``) holding
  output ``8j + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (the interleave its GEMM kernel reads);
- ``qzeros`` int32 [k / group, n / 8], packed the same way; ``scales`` float16 [k / group, n];
- ``w[o, i] = (q[i, o] - z[i // group, o]) * scales[i // group, o]`` (true zero points, no offset).
"""
from __future__ import annotations

import torch

from .prequantized import GridWeight, config_error, expect_shape, take, unpack_int32

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# nibble i holds output ORDER[i]: output c of a word is nibble UNDO[c]
UNDO = tuple(ORDER.index(c) for c in range(8))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] in AWQ's interleaved nibble order -> int32 codes [rows, cols] in output order."""
    nibbles = unpack_int32(packed, 4, 1).reshape(packed.shape[0], packed.shape[1], 8)
    return nibbles[..., list(UNDO)].reshape(packed.shape[0], packed.shape[1] * 8)


class Format:
    """One AWQ quantization_config; raises :class:`ModelLoadError` naming an unsupported field."""

    def __init__(self, qcfg: dict) -> None:
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise config_error("version", qcfg.get("version"), "gemm")
        bits = qcfg.get("bits", qcfg.get("w_bit", 4))
        if bits != 4:
            raise config_error("bits", bits, "4")
        self.group_size = qcfg.get("group_size", qcfg.get("q_group_size", 128))
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise config_error("group_size", self.group_size, "a positive number of inputs")
        if qcfg.get("zero_point", True) is False:
            raise config_error("zero_point", False, "true (AWQ GEMM checkpoints store zero points)")

    def read_linear(self, prefix: str, tensors: dict[str, torch.Tensor]) -> GridWeight | torch.Tensor:
        """``prefix``'s weight as a GridWeight (or its float weight when it was left unquantized)."""
        if prefix + ".qweight" not in tensors and prefix + ".weight" in tensors:
            return tensors.pop(prefix + ".weight")
        qweight = take(tensors, prefix + ".qweight")
        qzeros, scales = take(tensors, prefix + ".qzeros"), take(tensors, prefix + ".scales")
        k, n = qweight.shape[0], qweight.shape[1] * 8
        if k % self.group_size:
            raise config_error("group_size", self.group_size, f"a divisor of {prefix}'s {k} inputs")
        groups = k // self.group_size
        expect_shape(prefix + ".scales", scales, (groups, n), f"qweight {list(qweight.shape)} at group_size "
                     f"{self.group_size}")
        expect_shape(prefix + ".qzeros", qzeros, (groups, n // 8), f"4-bit codes of {n} outputs")
        q = unpack_awq(qweight).t().contiguous()
        zero = unpack_awq(qzeros).t().float().contiguous()
        return GridWeight(q, scales.float().t().contiguous(), zero, 4, self.group_size, None, scales.dtype)
