"""The precision ladder for one model: weight bytes per format, computed from the layer
shapes (no weights loaded) and, with `measure=True`, measured on the quantized model."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .config import INT4_GROUP_SIZES, QuantConfig

# a quantized GGUF also gets a "gguf" row: its own blocks, as the engine runs it by default
LADDER = ("fp32", "fp16", "bf16", "int8", "int4", "nf4", "nf4-dq")
_GGUF_BLOCK32 = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "IQ4_NL"}


@dataclass(slots=True)
class Shapes:
    """Linear layer shapes [(out, in)], other parameter count, and where the weights come from."""

    name: str
    linears: list[tuple[int, int]]
    lm_head: tuple[int, int]
    lm_head_tied: bool
    other_params: int  # embeddings and norms: kept at 16 bits by every quantized format
    source_qtype: str | None = None  # GGUF type of the projections, e.g. "Q4_1"
    gguf_bytes: tuple[int, int] | None = None  # a quantized GGUF as it runs: (projection bytes, all bytes)

    @property
    def params(self) -> int:
        head = 0 if self.lm_head_tied else self.lm_head[0] * self.lm_head[1]
        return sum(n * k for n, k in self.linears) + head + self.other_params


def shapes_of(model: str | None) -> Shapes:
    """Returns the Linear shapes of a GGUF file, HF directory or `dummy:<preset>` without
    loading weights. Raises ModelLoadError for a missing or unsupported model."""
    from servelm.engine.models.config import ModelConfig, preset
    from servelm.engine.models.loader import resolve_model

    spec = resolve_model(model)
    qtype, gguf_bytes = None, None
    if isinstance(spec, str):
        cfg = preset(spec.split(":", 1)[1])
    elif spec.suffix == ".gguf":
        import gguf

        from servelm.engine.models import gguf_loader

        reader, arch = gguf_loader.open_gguf(spec)
        cfg = gguf_loader._config(reader, arch, spec)
        names = {t.name: t.tensor_type.name for t in reader.tensors}
        cfg.tie_word_embeddings = "output.weight" not in names
        qtype = names.get("blk.0.attn_q.weight")
        if qtype not in (None, "F32", "F16", "BF16"):  # the default: the file's own blocks
            proj = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.")
            gguf_bytes = (sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.")
                              and any(p in t.name for p in proj)),
                          sum(int(t.n_bytes) for t in reader.tensors if t.name != "rope_freqs.weight"))
    else:
        cfg = ModelConfig.from_hf_dict(json.loads((spec / "config.json").read_text()), spec.name)
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    per_layer = [((cfg.num_heads + 2 * cfg.num_kv_heads) * hd, h), (h, cfg.num_heads * hd), (2 * i, h), (h, i)]
    other = cfg.vocab_size * h + (2 * cfg.num_layers + 1) * h
    return Shapes(cfg.name, per_layer * cfg.num_layers, (cfg.vocab_size, h), cfg.tie_word_embeddings, other, qtype,
                  gguf_bytes)


def auto_group(method: str, linears: list[tuple[int, int]], source_qtype: str | None) -> int | None:
    """Returns the group size quantize_model would pick without loading (see apply._resolve_group)."""
    if method == "int8":
        return None
    if source_qtype in _GGUF_BLOCK32 and all(k % 32 == 0 for _, k in linears):
        return 32
    for g in ((128, 64, 32) if method == "int4" else (64, 32)):
        if all(k % g == 0 for _, k in linears):
            return g
    return 32


def linear_bytes(method: str, n: int, k: int, group: int | None, dq_block: int = 256) -> int:
    """Returns the stored bytes of one [n, k] weight in `method`, matching the modules' buffers."""
    if method == "fp32":
        return 4 * n * k
    if method in ("fp16", "bf16"):
        return 2 * n * k
    if method == "int8":
        return n * k + 4 * n  # int8 codes + fp32 scale per row
    groups = n * (k // group)
    if method == "int4":
        return n * k // 2 + 4 * groups  # bf16 scale + bf16 zero per group
    if method == "nf4":
        return n * k // 2 + 4 * groups  # fp32 absmax per group (QLoRA)
    if method == "nf4-dq":
        blocks = math.ceil(groups / dq_block)
        return n * k // 2 + blocks * dq_block + 4 * blocks + 4  # int8 absmax (padded), fp32 per block, mean
    raise ValueError(f"unknown format {method!r}; valid: {', '.join(LADDER)}")


def ladder(model: str | None, group_size: int | None = None, include_lm_head: bool = False,
           measure: bool = False) -> dict:
    """Returns {model, params, formats: {fmt: {computed_bytes, measured_bytes?, group_size}}}.

    Measuring loads the model once per quantized format (bf16 on CPU)."""
    s = shapes_of(model)
    out = {"model": s.name, "params": s.params, "source_qtype": s.source_qtype,
           "lm_head_quantized": include_lm_head, "formats": {}}
    head_n, head_k = s.lm_head
    if s.gguf_bytes:  # what the engine runs by default: the GGUF's blocks, embeddings and head included
        proj, total = s.gguf_bytes
        out["formats"]["gguf"] = {"computed_bytes": total, "group_size": None, "source": s.source_qtype,
                                  "projection_bits_per_weight": round(8 * proj / sum(n * k for n, k in s.linears), 4)}
    for fmt in LADDER:
        quant = fmt in ("int8", "int4", "nf4", "nf4-dq")
        # a requested group size int4's kernels cannot take (e.g. 16 for nf4) leaves int4 on its own
        asked = group_size if fmt != "int4" or group_size in INT4_GROUP_SIZES else None
        g = (asked or auto_group(fmt, s.linears, s.source_qtype)) if quant and fmt != "int8" else None
        keep = 4 if fmt == "fp32" else 2  # bytes per unquantized parameter
        proj = sum(linear_bytes(fmt, n, k, g) for n, k in s.linears)
        total = proj + s.other_params * keep
        if quant and include_lm_head:
            total += linear_bytes(fmt, head_n, head_k, g)
        elif not s.lm_head_tied:
            total += head_n * head_k * keep
        # bits per projection weight, scales and double-quantization constants included
        bits = 8 * proj / sum(n * k for n, k in s.linears)
        out["formats"][fmt] = {"computed_bytes": total, "group_size": g, "projection_bits_per_weight": round(bits, 4)}
    if measure:
        from servelm.engine.models.loader import load_model

        from .apply import model_weight_bytes, quantize_model

        if "gguf" in out["formats"]:
            loaded = load_model(model, torch.float32, torch.device("cpu"), gguf_blocks=True)
            out["formats"]["gguf"]["measured_bytes"] = model_weight_bytes(loaded.model)
            del loaded
        for fmt in LADDER:
            dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(fmt, torch.bfloat16)
            loaded = load_model(model, dtype, torch.device("cpu"))
            if fmt in ("int8", "int4", "nf4", "nf4-dq"):
                quantize_model(loaded.model, QuantConfig(fmt, group_size, include_lm_head), loaded.source_qtypes)
            out["formats"][fmt]["measured_bytes"] = model_weight_bytes(loaded.model)
            del loaded
    return out


def format_ladder(r: dict) -> str:
    """Returns the ladder as an aligned text table (GB = 1e9 bytes; bits/w: stored bits per weight of
    the projections, their scales included)."""
    lines = [f"{r['model']}: {r['params'] / 1e6:.1f}M parameters"
             + (f" (source {r['source_qtype']})" if r.get("source_qtype") else ""),
             f"{'format':9} {'group':>5} {'bits/w':>7} {'computed':>12} {'measured':>12} {'vs fp16':>8}"]
    fp16 = r["formats"]["fp16"]["computed_bytes"]
    for fmt, v in r["formats"].items():
        meas = v.get("measured_bytes")
        label = f"GGUF {v['source']}" if fmt == "gguf" else fmt.upper()
        lines.append(f"{label:9} {v['group_size'] or '-':>5} {v['projection_bits_per_weight']:>7.3f} "
                     f"{v['computed_bytes'] / 1e9:>10.3f}GB "
                     f"{(f'{meas / 1e9:.3f}GB') if meas else '-':>12} {v['computed_bytes'] / fp16:>7.2f}x")
    return "\n".join(lines)
