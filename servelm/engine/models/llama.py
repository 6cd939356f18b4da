"""A Llama-family decoder in plain PyTorch (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, Phi-3), and its
mixture-of-experts variants (Mixtral, Qwen2-MoE, Qwen3-MoE: the MLP is ``moe.SparseMoeBlock``).

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


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with llama3/linear scaling (or a GGUF's per-frequency
    divisors, ``freq_factors``) applied."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
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
    raise ModelLoadError(f"unsupported rope scaling {kind!r}: servelm supports llama3 and linear")


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq = rope_inv_freq(cfg)
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        half = inv_freq.shape[0]
        # sin with the rotate-half sign folded in: x * cos + cat(-x2, x1) * sin == x * cos + cat(x2, x1) * sin_signed
        # (bitwise: negation is exact), two ops fewer per tensor on the eager path.
        self.register_buffer("sin_signed", torch.cat((-emb.sin()[:, :half], emb.sin()[:, half:]), dim=-1),
                             persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[T, 1, head_dim]`` at ``positions``; looked up once per forward for all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin_signed[positions].unsqueeze(1).to(dtype)

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
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
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
        if self.window is None:
            o = ctx.attention(self.layer_idx, q, k, v, rotary=(rope, positions, cos_sin))
        else:
            o = ctx.attention(self.layer_idx, q, k, v, rotary=(rope, positions, cos_sin), window=self.window)
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
        cos_sin = self.rope.tables(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, cos_sin, self.rope, ctx)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
