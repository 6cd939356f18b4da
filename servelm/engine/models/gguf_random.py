"""Write a random-weight GGUF in a real shape, as llama.cpp lays one out (for tests and benchmarks).

Matrices are raw blocks of the chosen type: random codes with sane fp16 scales (weights of roughly
``scale`` in size), so no float copy of the model is ever built and an 8B-shaped file is written in
seconds, tensor by tensor. Quantized random blocks are what ``dummy:<shape>`` is to float weights.

    from servelm.engine.models.gguf_random import write_random_gguf
    write_random_gguf("/tmp/llama-1b-q4_0.gguf", preset("llama-3.2-1b"), "Q4_0")
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from servelm.engine.models.config import ModelConfig

# offsets of the fp16 scales in each block, and the size of one weight step relative to ``scale``
# (so that a weight is about ``scale``): (field offset, multiple of the step), ...
_SCALES = {
    "Q8_0": [(0, 1 / 64)],
    "Q4_0": [(0, 1 / 4)],
    "Q4_1": [(0, 1 / 4), (2, -8.0)],  # m = -8 d: centred
    "Q5_0": [(0, 1 / 8)],
    "Q5_1": [(0, 1 / 8), (2, -16.0)],  # m = -16 d
    "Q4_K": [(0, 1 / 128), (2, 1 / 32)],  # d (times 6-bit scales), dmin (times 6-bit mins)
    "Q5_K": [(0, 1 / 256), (2, 1 / 32)],
    "Q6_K": [(208, 1 / 1024)],  # d, times int8 scales and 6-bit codes - 32
}


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """``n`` rows of ``k`` random weights in GGML type ``qtype`` as uint8 ``[n, row_bytes]``: float types
    hold normal(0, scale) values, block types random codes with fp16 scales near ``scale`` times the table
    above (each block's scale varies by up to 2x, as real ones do)."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype in ("F32", "F16"):
        return rng.normal(0, scale, (n, k)).astype(np.float32 if qtype == "F32" else np.float16).view(np.uint8)
    if qtype == "BF16":
        return gguf.quants.quantize(rng.normal(0, scale, (n, k)).astype(np.float32), t)
    if qtype not in _SCALES:
        raise ValueError(f"no random blocks for {qtype}; valid: F32, F16, BF16, {', '.join(_SCALES)}")
    block, size = gguf.GGML_QUANT_SIZES[t]
    nb = n * (k // block)
    raw = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    d = None
    for off, mult in _SCALES[qtype]:
        if d is None:
            d = (scale * mult * rng.uniform(0.5, 1.0, nb)).astype(np.float16)
            raw[:, off:off + 2] = d.view(np.uint8).reshape(nb, 2)
        elif mult < 0:  # an offset in units of d (Q4_1/Q5_1 "m")
            raw[:, off:off + 2] = (d.astype(np.float32) * mult).astype(np.float16).view(np.uint8).reshape(nb, 2)
        else:
            dm = (scale * mult * rng.uniform(0.5, 1.0, nb)).astype(np.float16)
            raw[:, off:off + 2] = dm.view(np.uint8).reshape(nb, 2)
    return raw.reshape(n, k // block * size)


def gguf_tensors(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, shape [rows, inputs] or [n]) of every tensor of a llama-family model, in file order."""
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = [("token_embd.weight", (cfg.vocab_size, h))]
    for b in range(cfg.num_layers):
        p = f"blk.{b}."
        out += [(p + "attn_norm.weight", (h,)), (p + "attn_q.weight", (q, h)), (p + "attn_k.weight", (kv, h)),
                (p + "attn_v.weight", (kv, h)), (p + "attn_output.weight", (h, q)), (p + "ffn_norm.weight", (h,)),
                (p + "ffn_gate.weight", (i, h)), (p + "ffn_up.weight", (i, h)), (p + "ffn_down.weight", (h, i))]
    out.append(("output_norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", (cfg.vocab_size, h)))
    return out


def write_random_gguf(path: str | Path, cfg: ModelConfig, qtype: str, seed: int = 0, scale: float = 0.02,
                      types: dict[str, str] | None = None, arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``cfg``'s shape as a ``cfg.arch`` GGUF at ``path``, every matrix in ``qtype`` (``types`` maps a
    GGUF tensor name to another type, e.g. ``{"output.weight": "Q6_K"}`` as in Q4_K_M files; ``arrays``
    gives a tensor's bytes or float values instead of random ones). Norms are F32 near 1. No tokenizer is
    written: load such a file with ``skip_tokenizer_init`` and token-id prompts. Returns the path.

    Tensors are generated and written one at a time, so writing an 8B shape needs one tensor of memory."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_name(cfg.name)
    w.add_block_count(cfg.num_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])
    types, arrays = types or {}, arrays or {}
    plan = []
    for name, shape in gguf_tensors(cfg):
        kind = "F32" if len(shape) == 1 else types.get(name, qtype)
        t = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(shape)) // block * size
        # the writer takes a uint8 tensor's shape in bytes (rows, row bytes), numpy order
        stored = shape if kind == "F32" else (shape[0], shape[1] // block * size)
        w.add_tensor_info(name, stored, np.dtype(np.float32 if kind == "F32" else np.uint8), nbytes,
                          raw_dtype=None if kind == "F32" else t)
        plan.append((name, shape, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, kind in plan:
        if name in arrays:
            data = arrays[name]
        elif len(shape) == 1:
            data = (1.0 + rng.normal(0, 0.1, shape)).astype(np.float32)
        else:
            data = random_blocks(kind, shape[0], shape[1], rng, scale)
        w.write_tensor_data(np.ascontiguousarray(data))
    w.close()
    return path
