"""The shape of a Llama-family decoder, read from a HF ``config.json``, GGUF metadata or a named preset."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


class ModelLoadError(ValueError):
    """The model path, file or architecture cannot be used. The message names the file."""


# Architectures this decoder implements (HF ``model_type`` / GGUF ``general.architecture``).
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(slots=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2)."""

    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q, k and v
    qk_norm: bool = False  # Qwen3 RMS-normalises each head's q and k before the rotary embedding
    name: str = "model"
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "model") -> "ModelConfig":
        """Build from a HF ``config.json`` dict; raises :class:`ModelLoadError` for other architectures."""
        arch = d.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}: servelm runs {', '.join(SUPPORTED_ARCHS)}")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(d),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            name=name,
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _rope_scaling(d: dict[str, Any]) -> dict[str, Any] | None:
    # transformers 5 moved rope settings into "rope_parameters"; older configs use "rope_scaling".
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        return None
    return dict(rs, rope_type=kind)


# Named real shapes for dummy-weight benchmarks (no download needed).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                         num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "mistral-7b": dict(arch="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                       rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen2-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
                       max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
                       rms_norm_eps=1e-6),
    "qwen3-0.6b": dict(arch="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                       max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True, rms_norm_eps=1e-6),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=2048),
}


def preset(name: str) -> ModelConfig:
    """Return the named shape; raises :class:`ModelLoadError` listing the known names."""
    if name not in PRESETS:
        raise ModelLoadError(f"unknown dummy model shape {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig(name=f"dummy-{name}", **PRESETS[name])
