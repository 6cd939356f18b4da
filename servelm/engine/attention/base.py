"""The interface between the model and an attention implementation over the paged KV cache.

The runner describes a batch once per step (:class:`BatchLayout`); a backend turns that
into an :class:`AttentionContext`, whose ``attention(layer, q, k, v, rotary)`` the model calls in
every layer (the rotary embedding goes in too, so a backend may fuse it with the K/V store).
Tokens are packed: first every sequence that computes several tokens this step ("prefills",
chunked or with a cached prefix), then the sequences decoding one token.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class BatchLayout:
    """Where each sequence's new tokens sit in the packed batch and where their K/V go.

    ``slot_mapping[t]`` is the flat cache slot (``block * block_size + offset``) of token ``t``.
    ``query_lens[i]``/``context_lens[i]``: new tokens and total tokens (cached + new) of sequence ``i``.
    ``block_tables``: ``[num_seqs, max_blocks]``, padded with 0. The first ``num_prefills``
    sequences are prefills; the rest have ``query_lens == 1``.
    """

    slot_mapping: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor
    num_prefills: int
    num_prefill_tokens: int
    context_lens_tensor: torch.Tensor  # context_lens on the device (decode kernels read it)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


SHORT_PREFILL = 32  # new tokens per sequence up to which a prefill runs as decode rows


def short_prefill_rows(layout: BatchLayout) -> bool:
    """True when every prefill of ``layout`` is short enough to run as decode rows."""
    return all(n <= SHORT_PREFILL for n in layout.query_lens[:layout.num_prefills])


def as_decode_rows(layout: BatchLayout) -> BatchLayout:
    """The same step with every token as its own decode row (its own causal context, its sequence's table)."""
    q_lens = layout.query_lens
    ctx = [c - n + 1 + j for n, c in zip(q_lens, layout.context_lens) for j in range(n)]
    dev = layout.block_tables.device
    repeats = torch.tensor(q_lens, device=dev)
    tables = torch.repeat_interleave(layout.block_tables, repeats, dim=0, output_size=len(ctx))
    return BatchLayout(slot_mapping=layout.slot_mapping, query_lens=[1] * len(ctx), context_lens=ctx,
                       block_tables=tables, num_prefills=0, num_prefill_tokens=0,
                       context_lens_tensor=torch.tensor(ctx, dtype=torch.int32).to(dev, non_blocking=True))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` and ``k`` with the rotary embedding ``rotary = (embedding, positions, cos_sin)`` applied (or as
    they are when ``rotary`` is None); ``embedding(positions, q, k, cos_sin)`` returns the rotated pair."""
    if rotary is None:
        return q, k
    embedding, positions, cos_sin = rotary
    return embedding(positions, q, k, cos_sin)


class AttentionContext(ABC):
    """Per-step attention state handed to the model's forward pass."""

    @abstractmethod
    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary=None,
                  window: int | None = None, softcap: float | None = None,
                  scale: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``q``/``k`` by ``rotary`` (see :func:`apply_rotary`; None: already rotated), write ``k``/``v``
        ([T, kv_heads, head_dim]) into the cache and return the attention output [T, heads, head_dim] for
        queries ``q`` ([T, heads, head_dim]).

        ``window``: each query sees only its ``window`` latest positions (itself included); ``softcap``: scores
        become ``softcap * tanh(score / softcap)``; ``scale``: this layer's score scale (default the step's);
        ``sinks`` (``[heads]``, gpt-oss): one more logit per head in each softmax's denominator, attending to
        nothing (the weights of the real keys then sum to less than one).
        A backend that cannot apply one of them raises NotImplementedError."""


class AttentionBackend(ABC):
    """Owns the KV tensors' layout and builds per-step contexts."""

    name: str = "base"

    @abstractmethod
    def allocate_kv_cache(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """Return one cache tensor per layer."""

    @abstractmethod
    def make_context(self, layout: BatchLayout, kv_caches: list[torch.Tensor], scale: float) -> AttentionContext:
        """Return the context the model uses for this step."""
