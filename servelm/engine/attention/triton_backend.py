"""Attention on CUDA through Triton kernels (``triton_kernels.py``) over the paged KV cache.

Per layer and step: one kernel applies the rotary embedding to q and k and stores the new K/V into
their slots (``fused.rope_store_kv``); one kernel runs every
prefill (chunked or behind a cached prefix) reading keys through the block tables; the
decodes run as flash-decoding (context split across programs, then merged). The layout is
the reference backend's, so both read the same cache (tests compare them on it).

Short prefills (at most ``SHORT_PREFILL`` new tokens each, e.g. a prompt whose long prefix came from
the prefix cache) run as decode rows instead: token ``j`` of a sequence is a query over its first
``prefix + j + 1`` tokens, which is what causal prefill computes. A step made only of such rows is
what the decode CUDA graphs replay (``cuda_graph.py``), so eager and graph steps use the same kernel
for them.
"""
from __future__ import annotations

import torch

from servelm.engine.attention.base import (AttentionBackend, AttentionContext, BatchLayout, apply_rotary,
                                           as_decode_rows, short_prefill_rows)
from servelm.engine.attention.triton_kernels import decode_attention, pick_num_splits, prefill_attention, store_kv
from servelm.engine.fused import rope_store_kv


def eager_num_splits(max_ctx: int) -> int:
    """The decode grid's context splits for an eager step: :func:`pick_num_splits` rounded up to a power of two.

    ``SPLITS`` is a compile-time constant of the kernels, so each value is one Triton compilation; by the
    longest context alone a server would compile a new pair of kernels every 64 tokens of context its
    traffic reaches (tenths of a second each, under live requests). Seven values cover every context,
    and the warm-up compiles them before ready (``servelm.engine.warmup``). Splits are PART tokens long
    whatever the grid (``_decode_split_kernel``), so the extra programs see no keys and the result is the
    same bit for bit."""
    n = pick_num_splits(max_ctx)
    return 1 << (n - 1).bit_length()


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def allocate_kv_cache(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        """One ``[2, num_blocks, block_size, kv_heads, head_dim]`` tensor per layer (zeroed: padded reads stay finite).

        Raises ValueError for a head_dim the kernels do not tile (not a power of two, or under 16)
        or a float32 cache (the kernels' matrix products take 16-bit inputs).
        """
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"the Triton attention backend needs a power-of-two head_dim >= 16, got {head_dim}; "
                             "use attention_backend='torch'")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the Triton attention backend runs float16 or bfloat16, not {dtype}; "
                             "set dtype='bfloat16' or attention_backend='torch'")
        return [torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                for _ in range(num_layers)]

    def make_context(self, layout: BatchLayout, kv_caches, scale, num_splits: int | None = None):
        """Context for one step. ``num_splits`` fixes the decode grid (CUDA graphs); default: by the longest context."""
        return TritonAttentionContext(layout, kv_caches, scale, num_splits)


class TritonAttentionContext(AttentionContext):
    def __init__(self, layout: BatchLayout, kv_caches: list[torch.Tensor], scale: float,
                 num_splits: int | None = None):
        if layout.num_prefills and short_prefill_rows(layout):
            layout = as_decode_rows(layout)
        self.layout = layout
        self.kv_caches = kv_caches
        self.scale = scale
        lay = layout
        dev = lay.block_tables.device
        self.num_prefills = lay.num_prefills
        self.num_decodes = lay.num_seqs - lay.num_prefills
        if self.num_prefills:
            q_lens = lay.query_lens[:lay.num_prefills]
            starts = [0]
            for n in q_lens[:-1]:
                starts.append(starts[-1] + n)
            # padded to whole 16 bytes, so q_lens starts 16-byte aligned whatever the number of prefills:
            # Triton specialises a kernel on its pointers' alignment (one more compilation per variant)
            pad = -len(q_lens) % 4
            meta = torch.tensor([starts + [0] * pad, q_lens + [0] * pad], dtype=torch.int32).to(dev, non_blocking=True)
            self.q_starts, self.q_lens = meta[0], meta[1]
            self.max_q_len = max(q_lens)
            self.prefill_tables = lay.block_tables[:lay.num_prefills]
            self.prefill_ctx = lay.context_lens_tensor[:lay.num_prefills]
        if self.num_decodes:
            self.decode_tables = lay.block_tables[lay.num_prefills:]
            self.decode_ctx = lay.context_lens_tensor[lay.num_prefills:]
            if lay.num_prefills % 4:  # a 16-byte aligned copy, as for q_lens above
                self.decode_ctx = self.decode_ctx.clone()
            if num_splits is None:
                num_splits = eager_num_splits(max(lay.context_lens[lay.num_prefills:]))
            self.num_splits = num_splits

    def attention(self, layer, q, k, v, rotary=None, window=None, softcap=None, scale=None, sinks=None):
        if window is not None or softcap is not None or sinks is not None:
            # the kernels have no window mask, score cap or sinks yet: such a model needs the torch backend
            raise NotImplementedError("the Triton attention kernels run no sliding window, soft-capping or "
                                      "attention sinks; run this model with --attention-backend torch")
        scale = self.scale if scale is None else scale
        cache = self.kv_caches[layer]
        k_cache, v_cache = cache[0], cache[1]
        lay = self.layout
        if rotary is not None and (rotary[2] is not None and rotary[0].long_after is not None):
            # longrope picks its tables per sequence (the model looked them up): rotate with those
            q, k = apply_rotary(q, k, rotary)
            rotary = None
        if rotary is None:
            store_kv(k, v, k_cache, v_cache, lay.slot_mapping)
        else:  # one launch instead of two; the rotated k lives only in the cache
            embedding, positions, _ = rotary
            q = rope_store_kv(positions, q, k, v, embedding.cos, embedding.sin, k_cache, v_cache, lay.slot_mapping)
        out = torch.empty_like(q)
        p = lay.num_prefill_tokens
        if self.num_prefills:
            prefill_attention(q[:p], out[:p], k_cache, v_cache, self.prefill_tables, self.q_starts, self.q_lens,
                              self.prefill_ctx, self.max_q_len, scale)
        if self.num_decodes:
            decode_attention(q[p:], out[p:], k_cache, v_cache, self.decode_tables, self.decode_ctx,
                             self.num_splits, scale)
        return out
