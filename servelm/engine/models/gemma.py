"""Gemma 2 and Gemma 3 (text) decoders in plain PyTorch, on the same packed-token interface as ``llama.py``.

What differs from Llama: embeddings scaled by ``sqrt(hidden_size)``; RMS norms scale by ``1 + w``; each
sublayer has a norm before and after it; GeGLU (tanh GELU) MLP; the attention scale is
``query_pre_attn_scalar ** -0.5``; local layers attend through a sliding window, interleaved with global
ones; Gemma 2 soft-caps attention scores and final logits; Gemma 3 RMS-normalises q and k per head and
gives its local layers their own RoPE base.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from servelm.engine.models.config import ModelConfig
from servelm.engine.models.llama import RotaryEmbedding


def local_rope(cfg: ModelConfig) -> RotaryEmbedding | None:
    """The rotary tables of Gemma 3's sliding-window layers (their own base, unscaled); None for Gemma 2."""
    if not cfg.rope_local_base_freq:
        return None
    return RotaryEmbedding(dataclasses.replace(cfg, rope_theta=cfg.rope_local_base_freq, rope_scaling=None))


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + w)``, computed in float32 (Gemma's checkpoints store ``w`` around 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.float(), self.weight.shape, eps=self.eps) * (1.0 + self.weight.float())
        return out.to(x.dtype)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.window = cfg.window(layer_idx)
        self.softcap = cfg.attn_logit_softcapping
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def forward(self, x, positions, rope: RotaryEmbedding, ctx) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Gemma 3
            q, k = self.q_norm(q), self.k_norm(k)
        o = ctx.attention(self.layer_idx, q, k, v, rotary=(rope, positions, None), window=self.window,
                          softcap=self.softcap, scale=self.scale)
        return self.o_proj(o.reshape(-1, self.q_size))


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # rows [gate; up]
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, positions, rope, ctx):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, rope, ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaForCausalLM(nn.Module):
    """``forward`` returns final hidden states; ``compute_logits`` applies the (tied) LM head and soft-cap."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RotaryEmbedding(cfg)
        # Gemma 3's local layers rotate with their own base and no scaling; Gemma 2 shares one table
        self.rope_local = local_rope(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # the normaliser is rounded to the activations' dtype first, as transformers does
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        for layer in self.layers:
            rope = self.rope_local if self.rope_local is not None and layer.self_attn.window else self.rope
            x = layer(x, positions, rope, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)
