"""Quantization settings: which format, what group size, whether lm_head is included.

Parsed from the same strings users pass on the command line (`--quantization int4:g32`,
`--dtype bf16`) so the CLI, the server and `EngineConfig` share one validator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("int8", "int4", "nf4", "nf4-dq")
# torch's int4 packed kernels (CPU and CUDA tinygemm) accept only these group sizes.
INT4_GROUP_SIZES = (32, 64, 128, 256)
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(slots=True)
class QuantConfig:
    """One quantization recipe. `group_size=None` means "pick per source": 32 when the
    weights already sit on a 32-block 4-bit grid (GGUF Q4_0/Q4_1), else 128 (int4) / 64 (nf4)."""

    method: str | None = None
    group_size: int | None = None
    include_lm_head: bool = False
    dq_block: int = 256  # nf4-dq: how many first-level scales share one second-level scale
    lm_head_method: str | None = None  # lm_head in its own format ("int8"), e.g. int4 layers + int8 lm_head

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown quantization {self.method!r}; valid: none, {', '.join(METHODS)}")
        if self.group_size is not None:
            if self.method in (None, "int8"):
                raise ValueError(
                    f"group_size={self.group_size} does not apply to {self.method or 'no quantization'}: "
                    "int8 is per output channel; group sizes are for int4, nf4 and nf4-dq")
            if self.group_size <= 0 or self.group_size % 2:
                raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
            if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
                raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.lm_head_method not in (None, "int8"):
            raise ValueError(f"lm_head format {self.lm_head_method!r} is not supported; valid: int8")
        if self.dq_block <= 0:
            raise ValueError(f"dq_block must be positive, got {self.dq_block}")

    @classmethod
    def parse(cls, spec: str | None, include_lm_head: bool = False) -> "QuantConfig":
        """Parse 'int8', 'int4', 'int4:g32' / 'int4-g128' / 'int4:128', 'nf4', 'nf4-dq', 'none';
        a '+lm_head' suffix (e.g. 'int4:g32+lm_head') quantizes lm_head as well.

        Returns a validated QuantConfig; raises ValueError naming the valid formats."""
        if spec is None:
            return cls(None, include_lm_head=include_lm_head)
        if isinstance(spec, QuantConfig):
            return spec
        s = str(spec).strip().lower().replace("_", "-")
        lm_head_method = None
        if s.endswith("+lm-head:int8"):  # e.g. "int4+lm_head:int8": lm_head per-row int8 (a Q8_0 tied head stays close)
            s, lm_head_method = s.removesuffix("+lm-head:int8"), "int8"
        if s.endswith("+lm-head"):  # e.g. "int4+lm_head": quantize the output projection too
            s, include_lm_head = s.removesuffix("+lm-head"), True
        if s in ("", "none", "no", "off"):
            return cls(None, include_lm_head=include_lm_head, lm_head_method=lm_head_method)
        group = None
        for sep in (":", "-g", "@"):
            head, found, tail = s.rpartition(sep)
            if found and head in METHODS and tail.lstrip("g").isdigit():
                s, group = head, int(tail.lstrip("g"))
                break
        aliases = {"nf4dq": "nf4-dq", "nf4-double-quant": "nf4-dq", "q8": "int8", "q4": "int4"}
        s = aliases.get(s, s)
        if s not in METHODS:
            raise ValueError(
                f"unknown quantization {spec!r}; valid: none, int8, int4[:gN] (N in {INT4_GROUP_SIZES}), "
                "nf4[:gN], nf4-dq[:gN], each optionally followed by +lm_head or +lm_head:int8")
        return cls(s, group, include_lm_head=include_lm_head, lm_head_method=lm_head_method)

    def label(self) -> str:
        """Returns the canonical spelling, e.g. 'int4:g32' or 'bf16-weights' when not quantized."""
        head = "+lm_head:int8" if self.lm_head_method else ("+lm_head" if self.include_lm_head else "")
        if self.method is None:
            return "none" + head if head else "none"
        return self.method + (f":g{self.group_size}" if self.group_size else "") + head


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """Map 'bf16'/'bfloat16'/'float16'/'fp32'/'auto'/None to a torch dtype; ValueError otherwise."""
    if name is None or name == "auto":
        return default
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise ValueError(f"unsupported dtype {name}; valid: float32, bfloat16, float16")
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: float32, bfloat16, float16 (or fp32, bf16, fp16, auto)")
    return DTYPES[key]
