"""A Llama-family decoder in plain PyTorch (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, Phi-3), and its
mixture-of-experts variants (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss: the MLP is ``moe.SparseMoeBlock``;
gpt-oss's attention also has an output bias and sinks).

Tokens arrive flattened (``[num_tokens]``, many sequences packed together, vLLM-style),
so prefill, chunked prefill and decode run the same code. Attention over the paged KV
cache is delegated to ``ctx.attention`` (see ``engine/attention``), which keeps this file
free of any cache bookkeeping.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from servelm.engine.models.config import ModelConfig, ModelLoadError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)``: the residual stream's add
        and the next norm in one call, so a GPU kernel can fuse them (``fused.py``)."""
        if residual is not None:
            x = x + residual
        # Normalise in float32 as the reference implementation does, then cast back.
        # F.rms_norm is one fused op (bitwise equal to x * rsqrt(mean(x^2) + eps) here).
        out = self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return out if residual is None else (out, x)


def rope_inv_freq(cfg: ModelConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with llama3/linear/yarn/longrope scaling (or a GGUF's
    per-frequency divisors, ``freq_factors``) applied; ``long`` picks longrope's ``long_factor`` (else
    ``short_factor``). Raises :class:`ModelLoadError` for another scaling.

    The formulas are transformers' (``modeling_rope_utils``), written out here so that the tables are built
    once at load without a transformers config object; the parity tests check them against it."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq
    kind = rs.get("rope_type")
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "freq_factors":
        factors = torch.tensor(rs["factors"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ModelLoadError(f"rope_freqs has {factors.numel()} factors; head_dim {cfg.head_dim} needs "
                                 f"{inv_freq.numel()}")
        return inv_freq / factors
    if kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "yarn":  # NTK-by-parts: high frequencies kept, low ones interpolated, a linear ramp between
        factor, old_len = _yarn_factor(cfg), rs["original_max_position_embeddings"]
        base = cfg.rope_theta

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(rs.get("beta_fast") or 32), correction_dim(rs.get("beta_slow") or 1)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation = 1 - ramp
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    if kind == "longrope":
        ext = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32)
        if ext.shape != inv_freq.shape:
            raise ModelLoadError(f"longrope has {ext.numel()} factors; head_dim {cfg.head_dim} needs "
                                 f"{inv_freq.numel()}")
        return 1.0 / (ext * cfg.rope_theta ** exponents)
    raise ModelLoadError(f"unsupported rope scaling {kind!r}: servelm supports llama3, linear, yarn and longrope")


def _yarn_factor(cfg: ModelConfig) -> float:
    rs = cfg.rope_scaling
    return rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor yarn and longrope multiply cos and sin by (1.0 for the other scalings)."""
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type")
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    if kind == "yarn":
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        factor = _yarn_factor(cfg)
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            return mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        return mscale(factor)
    if kind == "longrope":
        old_len = rs["original_max_position_embeddings"]
        factor = rs.get("factor") or rs.get("max_position_embeddings", cfg.max_position_embeddings) / old_len
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    return 1.0


def _cos_sin(cfg: ModelConfig, long: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(cfg, long)
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = rope_attention_factor(cfg)
    cos, sin = emb.cos() * scale, emb.sin() * scale
    half = inv_freq.shape[0]
    # sin with the rotate-half sign folded in: x * cos + cat(-x2, x1) * sin == x * cos + cat(x2, x1) * sin_signed
    # (bitwise: negation is exact), two ops fewer per tensor on the eager path.
    return cos, sin, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position.

    With longrope scaling (Phi-3) there is a second set of tables, ``long_cos``/``long_sin_signed``: as in
    transformers, a sequence whose context this step is longer than ``original_max_position_embeddings``
    rotates all its new tokens with the long factors, a shorter one with the short factors; the scheduler
    recomputes a sequence whose decoding crosses that length (``SchedulerConfig.long_context_after``). A prompt
    longer than that length split into prefill chunks rotates its chunks that end within it with the short
    factors (transformers, which never chunks, would rotate them with the long ones)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cos, sin, sin_signed = _cos_sin(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("sin_signed", sin_signed, persistent=False)
        self.long_after = None  # context length past which the long tables apply (longrope only)
        if (cfg.rope_scaling or {}).get("rope_type") == "longrope":
            self.long_after = int(cfg.rope_scaling["original_max_position_embeddings"])
            long_cos, _, long_sin_signed = _cos_sin(cfg, long=True)
            self.register_buffer("long_cos", long_cos, persistent=False)
            self.register_buffer("long_sin_signed", long_sin_signed, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype,
               long_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[T, 1, head_dim]`` at ``positions``; looked up once per forward for all layers.
        ``long_rows`` (bool ``[T]``, longrope only) marks the tokens that take the long tables."""
        cos, sin = self.cos[positions], self.sin_signed[positions]
        if long_rows is not None:
            rows = long_rows[:, None]
            cos = torch.where(rows, self.long_cos[positions], cos)
            sin = torch.where(rows, self.long_sin_signed[positions], sin)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def long_rows(self, ctx) -> torch.Tensor | None:
        """bool ``[T]``: the tokens of this step whose sequence's context is past ``long_after``; None when the
        embedding has no long tables. Read from the step's attention layout (query and context lengths)."""
        if self.long_after is None:
            return None
        lay = ctx.layout
        lens = lay.context_lens_tensor.to(torch.int64)
        per_seq = lens > self.long_after
        if lay.num_prefills == 0:  # decode rows only: one token per sequence (the CUDA-graph path)
            return per_seq
        return torch.repeat_interleave(per_seq, torch.tensor(lay.query_lens, device=lens.device),
                                       output_size=int(sum(lay.query_lens)))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin=None):
        cos, sin_signed = cos_sin if cos_sin is not None else self.tables(positions, q.dtype)
        return q * cos + _swap_halves(q) * sin_signed, k * cos + _swap_halves(k) * sin_signed


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # q, k and v in one matmul: rows [q; k; v].
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        # gpt-oss: a learned logit per head that joins every softmax (attends to nothing)
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads), requires_grad=False) if cfg.attention_sinks else None
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.window = cfg.window(layer_idx)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin, rope: RotaryEmbedding, ctx) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        # rotary embedding on q and k, K/V into the cache, attention: [T, num_heads, head_dim]
        if self.window is None and self.sinks is None:
            o = ctx.attention(self.layer_idx, q, k, v, rotary=(rope, positions, cos_sin))
        else:
            o = ctx.attention(self.layer_idx, q, k, v, rotary=(rope, positions, cos_sin), window=self.window,
                              sinks=self.sinks)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        self.intermediate_size = inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)  # rows [gate; up]
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            from servelm.engine.models.moe import SparseMoeBlock

            self.mlp = SparseMoeBlock(cfg)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, residual, positions, cos_sin, rope, ctx):
        """(this layer's MLP output, the residual stream before it); the stream is ``x + residual``.

        The residual add is deferred into the next norm (vLLM's layout): x + attn(norm(x)) + mlp(...)
        computed as the same additions in the same order, one kernel each on CUDA."""
        if residual is None:  # first layer: the stream is the embeddings
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, cos_sin, rope, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """``forward`` returns final hidden states; ``compute_logits`` applies the LM head to chosen rows."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos_sin = self.rope.tables(positions, x.dtype, self.rope.long_rows(ctx))
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, cos_sin, self.rope, ctx)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
