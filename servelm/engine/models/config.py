"""The shape of a Llama-family decoder, read from a HF ``config.json``, GGUF metadata or a named preset."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


class ModelLoadError(ValueError):
    """The model path, file or architecture cannot be used. The message names the file."""


# Architectures servelm implements (HF ``model_type`` / GGUF ``general.architecture``): the Llama layout
# (``llama.py``, run natively on the CPU from GGUF blocks), its mixture-of-experts variants (same file, the
# MLP replaced by ``moe.py``; gpt-oss adds attention sinks and biases) and Gemma (``gemma.py``).
LLAMA_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
GEMMA_ARCHS = ("gemma2", "gemma3_text")
SUPPORTED_ARCHS = LLAMA_ARCHS + MOE_ARCHS + GEMMA_ARCHS + ("phi3",)
# Architectures people ask for that servelm does not run, with why (the error says so).
_UNSUPPORTED_WHY = {
    "deepseek_v2": "multi-head latent attention (MLA) is not implemented",
    "deepseek_v3": "multi-head latent attention (MLA) is not implemented",
    "gemma3": "it has a vision tower; pass a text-only Gemma 3 (model_type gemma3_text)",
    "llava": "it has a vision tower", "qwen2_vl": "it has a vision tower", "qwen2_5_vl": "it has a vision tower",
    "mllama": "it has a vision tower", "mistral3": "it has a vision tower", "llama4": "it has a vision tower",
}


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
    # sliding-window attention: a query sees the ``sliding_window`` latest positions (itself included) in the
    # layers ``layer_types`` marks "sliding_attention" (every layer when ``layer_types`` is None)
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # mixture of experts: ``num_experts`` experts of ``moe_intermediate_size``, ``num_experts_per_tok`` routed per
    # token by a softmax router (top-k weights renormalised with ``norm_topk_prob``), in the layers ``moe_layers``
    # (None: all); a shared expert of ``shared_expert_intermediate_size`` behind a sigmoid gate (Qwen2-MoE)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: list[int] | None = None
    # gpt-oss: the router has a bias and takes the softmax over the top-k logits only; experts have biases
    # and a clamped SwiGLU ``(clamp(up) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``;
    # attention has an o_proj bias and a learned sink logit per head
    router_bias: bool = False
    softmax_after_topk: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    o_proj_bias: bool = False
    attention_sinks: bool = False
    # Gemma: tanh soft-capping of the final logits and of attention scores; the attention scale is
    # query_pre_attn_scalar ** -0.5; Gemma 3's sliding layers use their own RoPE base
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    rope_local_base_freq: float | None = None
    name: str = "model"
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "model") -> "ModelConfig":
        """Build from a HF ``config.json`` dict; raises :class:`ModelLoadError` for other architectures."""
        arch = d.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHS:
            why = _UNSUPPORTED_WHY.get(arch)
            raise ModelLoadError(
                f"unsupported architecture {arch!r}{f' ({why})' if why else ''}: servelm runs "
                f"{', '.join(SUPPORTED_ARCHS)}")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        cfg = cls(
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
            attention_bias=arch == "qwen2" or bool(d.get("attention_bias", d.get("qkv_bias", False))),
            qk_norm=arch in ("qwen3", "qwen3_moe", "gemma3_text"),
            name=name,
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )
        if d.get("use_sliding_window", True) and d.get("sliding_window"):
            cfg.sliding_window = int(d["sliding_window"])
            cfg.layer_types = list(d["layer_types"]) if d.get("layer_types") else None
        if arch == "gemma2" and cfg.sliding_window and not cfg.layer_types:  # configs before layer_types
            cfg.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_layers)]
        if arch == "gemma3_text" and cfg.sliding_window and not cfg.layer_types:
            every = d.get("sliding_window_pattern", 6)
            cfg.layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                               for i in range(cfg.num_layers)]
        if arch in MOE_ARCHS:
            cfg.num_experts = d.get("num_local_experts") or d["num_experts"]
            cfg.num_experts_per_tok = d["num_experts_per_tok"]
            cfg.moe_intermediate_size = d.get("moe_intermediate_size") or d["intermediate_size"]
            cfg.norm_topk_prob = arch == "mixtral" or bool(d.get("norm_topk_prob", False))
            cfg.shared_expert_intermediate_size = d.get("shared_expert_intermediate_size") or 0
            step, dense = d.get("decoder_sparse_step", 1), set(d.get("mlp_only_layers") or [])
            cfg.moe_layers = [i for i in range(cfg.num_layers) if i not in dense and (i + 1) % step == 0]
        if arch == "gpt_oss":
            cfg.norm_topk_prob = False  # the softmax over the top-k already sums to one
            cfg.router_bias = cfg.softmax_after_topk = cfg.expert_bias = True
            cfg.o_proj_bias = cfg.attention_bias
            cfg.attention_sinks = True
            cfg.swiglu_limit, cfg.swiglu_alpha = float(d.get("swiglu_limit", 7.0)), float(d.get("swiglu_alpha", 1.702))
        rs = cfg.rope_scaling
        if rs and rs["rope_type"] in ("yarn", "longrope") and not rs.get("factor"):
            # fixed from the checkpoint's max_position_embeddings, before max_model_len caps the config's
            rs["factor"] = cfg.max_position_embeddings / rs["original_max_position_embeddings"]
        if rs and rs["rope_type"] == "longrope" and "original_max_position_embeddings" not in rs:
            rs["original_max_position_embeddings"] = d.get("original_max_position_embeddings",
                                                           cfg.max_position_embeddings)
        if arch in GEMMA_ARCHS:
            cfg.tie_word_embeddings = bool(d.get("tie_word_embeddings", True))
            cfg.final_logit_softcapping = d.get("final_logit_softcapping")
            cfg.attn_logit_softcapping = d.get("attn_logit_softcapping")
            cfg.query_pre_attn_scalar = d.get("query_pre_attn_scalar")
            if arch == "gemma3_text":
                rp = d.get("rope_parameters") or {}
                full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
                cfg.rope_theta = full.get("rope_theta", d.get("rope_theta", cfg.rope_theta))
                cfg.rope_local_base_freq = local.get("rope_theta", d.get("rope_local_base_freq", 10000.0))
                cfg.rope_scaling = _rope_scaling({"rope_scaling": full}) if full else cfg.rope_scaling
        return cfg

    @property
    def llama_layout(self) -> bool:
        """True for the dense Llama layout (the one the native CPU forward runs)."""
        return self.arch in LLAMA_ARCHS

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None where it attends to the whole context."""
        if not self.sliding_window:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def is_moe_layer(self, layer: int) -> bool:
        """True where ``layer``'s MLP is a mixture of experts."""
        return self.num_experts > 0 and (self.moe_layers is None or layer in self.moe_layers)

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
    "mixtral-8x7b": dict(arch="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                         max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=14336, norm_topk_prob=True),
    "qwen3-30b-a3b": dict(arch="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
                          max_position_embeddings=40960, qk_norm=True, rms_norm_eps=1e-6, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    "gemma-3-4b": dict(arch="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                       num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, rope_theta=1000000.0,
                       rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=10000.0,
                       max_position_embeddings=131072, tie_word_embeddings=True, qk_norm=True, rms_norm_eps=1e-6,
                       query_pre_attn_scalar=256, sliding_window=1024,
                       layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(34)]),
    "gpt-oss-20b": dict(arch="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                        num_layers=24, num_heads=64, num_kv_heads=8, head_dim=64, rope_theta=150000.0,
                        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "truncate": False, "original_max_position_embeddings": 4096},
                        max_position_embeddings=131072, rms_norm_eps=1e-5, attention_bias=True, o_proj_bias=True,
                        attention_sinks=True, sliding_window=128,
                        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
                        num_experts=32, num_experts_per_tok=4, moe_intermediate_size=2880, norm_topk_prob=False,
                        router_bias=True, softmax_after_topk=True, expert_bias=True, swiglu_limit=7.0),
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=2048),
}


def preset(name: str) -> ModelConfig:
    """Return the named shape; raises :class:`ModelLoadError` listing the known names."""
    if name not in PRESETS:
        raise ModelLoadError(f"unknown dummy model shape {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig(name=f"dummy-{name}", **PRESETS[name])
