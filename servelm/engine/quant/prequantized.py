"""Checkpoints someone already quantized (a ``quantization_config`` in config.json): GPTQ, AWQ,
compressed-tensors and FP8 safetensors directories.

Each format's file (gptq.py, awq.py, compressed.py, fp8.py) turns the tensors of one linear layer into one
of two exact forms, one layer at a time (no float copy of the model):

- :class:`GridWeight`, an integer grid ``w = (q - z) * s`` per group of inputs, held by :class:`Int4Linear`
  (4 bits, groups of 32..256 along the inputs) or :class:`Int8Linear` (8 bits, symmetric, per channel)
  with the same values; every other grid (desc_act orders, other group sizes) is dequantized to the
  compute dtype, with a log line;
- :class:`FP8Weight`, float8 e4m3 with per-tensor, per-channel or 128x128 block scales, held by
  :class:`FP8Linear` (W8A8 on CUDA cards with FP8, weight-only elsewhere).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from servelm.engine.models.config import ModelConfig, ModelLoadError

log = logging.getLogger("servelm.engine")

INT4_GROUPS = (32, 64, 128, 256)  # what torch's packed int4 kernels (and ours) take


@dataclass(slots=True)
class GridWeight:
    """An [n, k] weight ``w[i, j] = (q[i, j] - zero[i, j // group]) * scale[i, j // group]``.

    ``q`` int32 codes in 0..2**bits-1, ``zero`` and ``scale`` float32 [n, k // group] (the zero point may
    be fractional for no format we read, but it is held as float so that GPTQ's ``stored + 1`` fits);
    ``perm`` (optional, int64 [k]) is GPTQ's g_idx: input j belongs to group ``perm[j]`` instead of
    ``j // group``, with scale and zero [n, number of groups]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int
    g_idx: torch.Tensor | None = None
    scale_dtype: torch.dtype = torch.float16  # the dtype the checkpoint stored its scales in

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def group_of_inputs(self) -> torch.Tensor:
        """int64 [k]: the group index of each input."""
        k = self.q.shape[1]
        return self.g_idx if self.g_idx is not None else torch.arange(k) // self.group

    def dequantize(self) -> torch.Tensor:
        """The float32 [n, k] weight: exact for fp16/bf16 scales (an 11-bit mantissa times a code fits)."""
        gi = self.group_of_inputs()
        return (self.q.float() - self.zero[:, gi]) * self.scale[:, gi]

    def in_group_order(self) -> bool:
        """True when input j is in group j // group (no desc_act reordering)."""
        return self.g_idx is None or torch.equal(self.g_idx, torch.arange(self.q.shape[1]) // self.group)


@dataclass(slots=True)
class FP8Weight:
    """An [n, k] float8_e4m3fn weight and its float32 scale: [] (per tensor), [n, 1] (per channel) or
    [ceil(n/bn), ceil(k/bk)] with ``block=(bn, bk)``; ``w = weight * scale`` broadcast accordingly."""

    weight: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None = None
    input_scale: torch.Tensor | None = None  # a static activation scale, when the checkpoint has one

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 [n, k] weight."""
        return self.weight.float() * expand_scale(self.scale, self.shape, self.block)


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None) -> torch.Tensor:
    """``scale`` broadcastable to ``shape``: a 128x128 block grid repeated over its blocks."""
    if block is None:
        return scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(())
    n, k = shape
    bn, bk = block
    return scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The codes packed into int32 words along ``dim`` (0 or 1), element i of a word at bit ``i * bits``
    (the order GPTQ and compressed-tensors share); int32 in 0..2**bits-1. ``bits`` must divide 32."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    p = packed.to(torch.int32)
    if dim == 0:
        out = (p.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # [rows, per, cols]
        return out.reshape(p.shape[0] * per, p.shape[1])
    out = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, cols, per]
    return out.reshape(p.shape[0], p.shape[1] * per)


def take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Pop ``name``; raises :class:`ModelLoadError` naming it when the checkpoint lacks it."""
    if name not in tensors:
        raise ModelLoadError(f"tensor {name!r} is missing from the quantized checkpoint")
    return tensors.pop(name)


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    """Raises :class:`ModelLoadError` naming the tensor when its shape is not ``shape``."""
    if tuple(t.shape) != tuple(shape):
        raise ModelLoadError(f"tensor {name!r} has shape {list(t.shape)}, but {why} makes it {list(shape)}")


def config_error(field: str, value, supported: str) -> ModelLoadError:
    """The error for a quantization_config field we cannot load."""
    return ModelLoadError(f"quantization_config.{field} = {value!r} is not supported; supported: {supported}")


def reader_for(qcfg: dict):
    """The format module for a quantization_config; raises :class:`ModelLoadError` naming quant_method."""
    from . import awq, compressed, fp8, gptq

    formats = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed, "fp8": fp8}
    method = qcfg.get("quant_method")
    if method not in formats:
        raise config_error("quant_method", method, ", ".join(formats))
    return formats[method]


def _linear_shell(n: int, k: int, bias: torch.Tensor | None, dtype: torch.dtype,
                  device: torch.device) -> nn.Linear:
    # the quantized layers read only the weight's shape, dtype and device: an expanded scalar holds no memory
    lin = nn.Linear(k, n, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(n, k), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return lin


def _float_linear(w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  device: torch.device) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return lin


def _cat_grids(parts: list[GridWeight]) -> GridWeight | None:
    """q|k|v (or gate|up) as one grid, or None when the parts do not share one layout."""
    first = parts[0]
    if any((p.bits, p.group, p.g_idx is None) != (first.bits, first.group, first.g_idx is None) for p in parts):
        return None
    if first.g_idx is not None and any(not torch.equal(p.g_idx, first.g_idx) for p in parts):
        return None
    return GridWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                      torch.cat([p.zero for p in parts]), first.bits, first.group, first.g_idx,
                      first.scale_dtype)


def grid_module(name: str, g: GridWeight, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                max_rows: int) -> tuple[nn.Module, str]:
    """The layer that holds ``g`` exactly, and how (e.g. "int4 g128"): Int4Linear for a 4-bit grid in
    group order with a group size the kernels take (a per-channel grid repeats its scale over groups of
    128, the same values), Int8Linear for a symmetric 8-bit per-channel grid, else a float nn.Linear in
    ``dtype`` (logged: that one is dequantized, never re-quantized)."""
    from .int4 import Int4Linear
    from .int8 import Int8Linear

    n, k = g.shape
    ordered = g.in_group_order()
    if g.bits == 4 and ordered:
        group = g.group if g.group in INT4_GROUPS else next((c for c in (128, 64, 32) if g.group == k and k % c == 0),
                                                            None)
        if group is not None and k % group == 0:
            reps = g.group // group
            scale, zero_pt = g.scale.repeat_interleave(reps, 1), g.zero.repeat_interleave(reps, 1)
            # Int4Linear's form is w = (q - 8) * scale + zero, so its zero is (8 - z) * s: exact in float32
            # for fp16/bf16 scales; a float32 scale times (8 - z) may round, so that case is checked
            zero = (8.0 - zero_pt) * scale
            exact = g.scale_dtype != torch.float32 or torch.equal(
                ((g.q.float() - 8).reshape(n, k // group, group) * scale[..., None] + zero[..., None]).reshape(n, k),
                g.dequantize())
            if exact:
                lin = _linear_shell(n, k, bias, dtype, device)
                held = torch.float32 if device.type == "cpu" and dtype == torch.float32 else torch.bfloat16
                return (Int4Linear(lin, group, max_rows, codes=(g.q, scale, zero), scale_dtype=held),
                        f"int4 g{group}")
    if g.bits == 8 and ordered and g.group == k and torch.all(g.zero == g.zero.flatten()[0]):
        codes = g.q - g.zero.flatten()[0].to(torch.int32)
        if codes.min() >= -128 and codes.max() <= 127:
            lin = _linear_shell(n, k, bias, dtype, device)
            return Int8Linear(lin, codes=(codes.to(torch.int8).to(device), g.scale[:, 0].to(device))), "int8"
    why = "its inputs are reordered (desc_act)" if not ordered else f"{g.bits}-bit group {g.group}"
    log.info("%s: %s has no exact kernel layout here; dequantized to %s", name, why, dtype)
    return _float_linear(g.dequantize(), bias, dtype, device), f"{g.bits}-bit dequantized"


def build_prequantized_model(cfg: ModelConfig, qcfg: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                             device: torch.device, max_rows: int = 1):
    """Assemble a Llama-family model from a quantized checkpoint's HF-named tensors (consumed as read).

    Returns (model, kinds) with ``kinds`` our fused layer name -> how it is held (e.g. "gptq int4 g128").
    Raises :class:`ModelLoadError` for an unsupported quantization_config (naming the field and value) or
    a tensor that disagrees with it (naming the tensor)."""
    from servelm.engine.models.llama import LlamaForCausalLM, RotaryEmbedding

    from .fp8 import FP8Linear

    reader = reader_for(qcfg)
    fmt = reader.Format(qcfg)
    method = qcfg["quant_method"]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    kinds: dict[str, str] = {}

    def linear(ours: str, names: list[str], bias_names: list[str] | None = None) -> nn.Module:
        bias = torch.cat([take(tensors, b) for b in bias_names]) if bias_names else None
        parts = [fmt.read_linear(n, tensors) for n in names]
        if all(isinstance(p, GridWeight) for p in parts):
            grid = _cat_grids(parts)
            if grid is not None:
                mod, how = grid_module(ours, grid, bias, dtype, device, max_rows)
                kinds[ours] = f"{method} {how}"
                return mod
        if all(isinstance(p, FP8Weight) for p in parts):
            mod = FP8Linear.from_parts(parts, bias, dtype, device)
            if mod is not None:
                kinds[ours] = f"{method} {mod.describe()}"
                return mod
        # mixed or unfusable parts (e.g. one projection left unquantized): one float matrix in ``dtype``
        ws = [p.to(torch.float32) if isinstance(p, torch.Tensor) else p.dequantize() for p in parts]
        if any(not isinstance(p, torch.Tensor) for p in parts):
            log.info("%s: its parts are held differently; dequantized to %s", ours, dtype)
        if any(not isinstance(p, torch.Tensor) for p in parts):
            kinds[ours] = f"{method} dequantized"
        return _float_linear(torch.cat(ws), bias, dtype, device)

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layer.self_attn.qkv_proj = linear(f"layers.{i}.self_attn.qkv_proj",
                                          [a + "q_proj", a + "k_proj", a + "v_proj"],
                                          [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]
                                          if cfg.attention_bias else None)
        layer.self_attn.o_proj = linear(f"layers.{i}.self_attn.o_proj", [a + "o_proj"])
        layer.mlp.gate_up_proj = linear(f"layers.{i}.mlp.gate_up_proj", [p + "mlp.gate_proj", p + "mlp.up_proj"])
        layer.mlp.down_proj = linear(f"layers.{i}.mlp.down_proj", [p + "mlp.down_proj"])
    emb = take(tensors, "model.embed_tokens.weight").to(device=device, dtype=dtype)
    model.embed_tokens = nn.Embedding.from_pretrained(emb, freeze=True)
    if cfg.tie_word_embeddings:
        model.lm_head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device="meta")
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.lm_head = linear("lm_head", ["lm_head"])
    sd = {}
    for name, t in tensors.items():  # what is left: norms (and Qwen3's q/k norms)
        if name.endswith("norm.weight"):
            sd[name.removeprefix("model.")] = t.to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    model.rope = RotaryEmbedding(cfg).to(device)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(f"weights missing from the checkpoint: {', '.join(missing[:5])}")
    counts: dict[str, int] = {}
    for how in kinds.values():
        counts[how] = counts.get(how, 0) + 1
    log.info("quantized checkpoint (%s): %s", method, ", ".join(f"{c} layers {h}" for h, c in counts.items()))
    return model.eval(), kinds
