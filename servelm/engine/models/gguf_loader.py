"""GGUF files through the ``gguf`` package, dequantized to float at load.

llama.cpp's converter permutes the rows of q and k for the ``llama`` architecture
(interleaved rotary pairs); we undo that so the weights match the HF layout that
``llama.py`` and transformers use.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from servelm.engine.models.config import SUPPORTED_ARCHS, ModelConfig, ModelLoadError

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def read_gguf(path: Path, progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Return (config, HF-named float32 tensors, HF name -> GGUF quant type). Raises ModelLoadError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on corrupt files
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{path.name}: unsupported architecture {arch!r}; servelm runs {', '.join(SUPPORTED_ARCHS)}")
    cfg = _config(reader, arch, path)
    tensors: dict[str, torch.Tensor] = {}
    qtypes: dict[str, str] = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress):
        if t.name == "rope_freqs.weight":
            # Llama 3.1+ (llama3 rope scaling): llama.cpp's converter writes the per-frequency divisors
            # instead of the scaling parameters, and its rotary embedding divides each frequency by them
            factors = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
            cfg.rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
            continue
        hf_name = _hf_name(t.name)
        if hf_name is None:
            continue
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelLoadError(f"{path.name}: tensor {t.name} has unsupported type {t.tensor_type.name}") from e
        w = torch.from_numpy(np.array(arr, dtype=np.float32))  # copy: F32 tensors are read-only memmaps
        if arch in ("llama", "mistral"):
            if hf_name.endswith("q_proj.weight"):
                w = _unpermute(w, cfg.num_heads)
            elif hf_name.endswith("k_proj.weight"):
                w = _unpermute(w, cfg.num_kv_heads)
        tensors[hf_name] = w
        qtypes[hf_name] = t.tensor_type.name
    if "lm_head.weight" not in tensors:
        cfg.tie_word_embeddings = True
    return cfg, tensors, qtypes


def _hf_name(name: str) -> str | None:
    stem, _, kind = name.rpartition(".")  # kind: weight | bias
    if stem.startswith("blk."):
        _, idx, part = stem.split(".", 2)
        hf = _LAYER_NAMES.get(part)
        return f"model.layers.{idx}.{hf}.{kind}" if hf else None
    hf = _TOP_NAMES.get(stem)
    return f"{hf}.{kind}" if hf else None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(reader, arch: str, path: Path) -> ModelConfig:
    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads is None or hidden is None:
        raise ModelLoadError(f"{path.name}: GGUF metadata lacks {arch}.attention.head_count/embedding_length")
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    rope_scaling = None
    if get("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    name = _field(reader, "general.name") or path.stem
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=False,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        name=path.stem,
        eos_token_ids=sorted({int(x) for x in (eos, eot) if x is not None}),
    )
