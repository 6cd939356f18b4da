"""quantize_model: swap every nn.Linear (lm_head optional) for its quantized drop-in, in place."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .config import QuantConfig
from .int4 import Int4Linear, on_int4_grid
from .int8 import Int8Linear
from .nf4 import NF4Linear


@dataclass(slots=True)
class LayerReport:
    name: str
    out_features: int
    in_features: int
    method: str
    group_size: int | None
    bytes_before: int
    bytes_after: int


@dataclass(slots=True)
class QuantReport:
    """What quantize_model did: per-layer and total weight bytes before and after."""

    method: str | None
    group_size: int | None
    group_size_reason: str = ""
    layers: list[LayerReport] = field(default_factory=list)
    other_bytes: int = 0  # parameters left as they were (embeddings, norms, skipped layers)

    @property
    def linear_bytes_before(self) -> int:
        return sum(l.bytes_before for l in self.layers)

    @property
    def linear_bytes_after(self) -> int:
        return sum(l.bytes_after for l in self.layers)

    @property
    def total_bytes_after(self) -> int:
        return self.linear_bytes_after + self.other_bytes

    def to_dict(self) -> dict:
        """Returns a JSON-ready dict with totals and one entry per layer."""
        return {"method": self.method, "group_size": self.group_size, "group_size_reason": self.group_size_reason,
                "linear_bytes_before": self.linear_bytes_before, "linear_bytes_after": self.linear_bytes_after,
                "other_bytes": self.other_bytes, "total_bytes_after": self.total_bytes_after,
                "layers": [asdict(l) for l in self.layers]}

    def summary(self) -> str:
        """Returns one human line: method, layers, bytes before -> after."""
        mb = 1 / 2**20
        return (f"{self.method or 'none'} (group {self.group_size or '-'}; {self.group_size_reason}): "
                f"{len(self.layers)} Linear layers {self.linear_bytes_before * mb:.1f} MiB -> "
                f"{self.linear_bytes_after * mb:.1f} MiB; total weights {self.total_bytes_after * mb:.1f} MiB")


def _targets(model: nn.Module, include_lm_head: bool) -> list[tuple[str, nn.Linear]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if name.split(".")[-1] == "lm_head" and not include_lm_head:
                continue
            out.append((name, mod))
    return out


# GGUF types stored in blocks of 32 weights along in_features (K-quants: 32-weight sub-blocks).
_GGUF_BLOCK32 = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "IQ4_NL"}


def _resolve_group(cfg: QuantConfig, targets: list[tuple[str, nn.Linear]],
                   source_qtypes: dict[str, str]) -> tuple[int | None, str]:
    if cfg.method in (None, "int8"):
        return None, "per output channel" if cfg.method else ""
    if cfg.group_size is not None:
        for name, lin in targets:
            if lin.in_features % cfg.group_size:
                raise ValueError(f"{cfg.method} group_size {cfg.group_size} does not divide in_features "
                                 f"{lin.in_features} of layer {name!r}; use a group size that divides it "
                                 f"(e.g. 32)")
        return cfg.group_size, "as requested"
    first_name, first = next(((n, lin) for n, lin in targets if n.split(".")[-1] != "lm_head"), (None, None))
    src = source_qtypes.get(f"{first_name}.weight")
    if src in _GGUF_BLOCK32 and all(l.in_features % 32 == 0 for _, l in targets):
        return 32, f"aligned to the GGUF {src} source's 32-weight blocks"
    if first is not None and all(l.in_features % 32 == 0 for _, l in targets) and on_int4_grid(first.weight.detach(), 32):
        # The source is already 4-bit in blocks of 32 (GGUF Q4_0/Q4_1): align to its blocks so
        # int4 reproduces the grid exactly and nf4 re-quantizes each source block on its own.
        return 32, "source already on a 32-block 4-bit grid"
    prefs = (128, 64, 32) if cfg.method == "int4" else (64, 32)
    for g in prefs:
        if all(l.in_features % g == 0 for _, l in targets):
            return g, "default"
    bad = [f"{n} (in_features {l.in_features})" for n, l in targets if l.in_features % 32]
    raise ValueError(f"no {cfg.method} group size divides every layer: {', '.join(bad[:3])}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig | str | None,
                   source_qtypes: dict[str, str] | None = None,
                   calibration: list[torch.Tensor] | None = None, max_rows: int = 1) -> QuantReport:
    """Replace the model's nn.Linear layers by quantized ones, in place.

    `source_qtypes` (param name -> GGUF type, from the loader) lets an automatic group size line
    up with a GGUF source's blocks, so a Q4_1 model quantized to int4 keeps its own grid.
    `calibration` (token-id windows of text that is not the evaluation text) gives nf4/nf4-dq the
    input statistics for their weighted block-scale search (calibrate.py); other formats ignore it.
    `max_rows` (the engine's max_num_seqs) lets int4 on CUDA pick the weight layout for the batch sizes
    it will serve (`int4.cuda_layout`).

    Returns a QuantReport with bytes per layer before/after. Raises ValueError (before touching
    the model) for an unknown format or a group size that does not divide a layer's in_features."""
    cfg = QuantConfig.parse(cfg) if not isinstance(cfg, QuantConfig) else cfg
    targets = _targets(model, cfg.include_lm_head and not cfg.lm_head_method) if cfg.method else []
    group, reason = _resolve_group(cfg, targets, source_qtypes or {})
    report = QuantReport(cfg.method, group, reason)
    importance = {}
    if calibration and cfg.method in ("nf4", "nf4-dq"):
        from .calibrate import input_importance

        importance = input_importance(model, targets, calibration)
        report.group_size_reason += f"; scales searched with {sum(c.numel() for c in calibration)} calibration tokens"
    for name, lin in targets:
        if cfg.method == "int8":
            q = Int8Linear(lin)
        elif cfg.method == "int4":
            q = Int4Linear(lin, group, max_rows)
        else:
            q = NF4Linear(lin, group, double_quant=cfg.method == "nf4-dq", dq_block=cfg.dq_block,
                          importance=importance.get(name))
        before = lin.weight.numel() * lin.weight.element_size()
        _set_module(model, name, q)
        report.layers.append(LayerReport(name, lin.out_features, lin.in_features, q.method, group,
                                         before, q.weight_nbytes()))
    if cfg.lm_head_method == "int8":  # its own format; a tied embedding keeps its table for lookups
        for name, lin in _targets(model, True):
            if name.split(".")[-1] == "lm_head":
                q = Int8Linear(lin)
                _set_module(model, name, q)
                report.layers.append(LayerReport(name, lin.out_features, lin.in_features, q.method, None,
                                                 lin.weight.numel() * lin.weight.element_size(), q.weight_nbytes()))
    report.other_bytes = sum(t.numel() * t.element_size() for t in _unique_tensors(model, skip_quant=True))
    return report


def _unique_tensors(model: nn.Module, skip_quant: bool) -> list[torch.Tensor]:
    from .base import QuantLinear
    quant_ids = set()
    if skip_quant:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                quant_ids.update(id(b) for b in m.buffers(recurse=False))
    out, seen = [], set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in quant_ids or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out.append(t)
    return out


def model_weight_bytes(model: nn.Module) -> int:
    """Returns bytes of all parameters and buffers, tied tensors counted once (measured memory)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model, skip_quant=False))
