"""Reference attention over the paged cache in plain PyTorch; runs anywhere, used on CPU.

Prefills run one sequence at a time through ``scaled_dot_product_attention`` (with an
explicit mask when part of the context is already cached). Decodes run as one batch:
each sequence's blocks are gathered through its block table, padded to the longest
context, and masked.

A layer may ask for a sliding window (a query sees its ``window`` latest positions, itself included),
tanh soft-capping of the scores (Gemma 2) and its own scale (Gemma's ``query_pre_attn_scalar``); the
masks of each window are built once per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from servelm.engine.attention.base import AttentionBackend, AttentionContext, BatchLayout, apply_rotary

DECODE_GROUP = 16  # decodes per padded attention call


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def allocate_kv_cache(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        # [2 (k, v), num_blocks, block_size, kv_heads, head_dim] per layer; zeros so padded reads stay finite.
        return [torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                for _ in range(num_layers)]

    def make_context(self, layout, kv_caches, scale):
        return TorchAttentionContext(layout, kv_caches, scale)


class TorchAttentionContext(AttentionContext):
    def __init__(self, layout: BatchLayout, kv_caches: list[torch.Tensor], scale: float):
        self.layout = layout
        self.kv_caches = kv_caches
        self.scale = scale
        self.block_size = kv_caches[0].shape[2]
        lay = layout
        self.num_decodes = lay.num_seqs - lay.num_prefills
        # Decodes run in groups of similar context length, each padded only to its own longest
        # context: gathering and attending over padding is most of the attention cost here.
        self.decode_groups = []  # (rows in the decode batch or None for all, L, flat block ids, mask or None)
        if self.num_decodes:
            tables = lay.block_tables[lay.num_prefills:].long()  # int32 indexing takes a slow path
            lens = lay.context_lens[lay.num_prefills:]
            ctx = lay.context_lens_tensor[lay.num_prefills:]
            if self.num_decodes <= DECODE_GROUP:
                chunks = [None]
            else:
                order = sorted(range(self.num_decodes), key=lens.__getitem__)
                chunks = [order[i:i + DECODE_GROUP] for i in range(0, self.num_decodes, DECODE_GROUP)]
            for rows in chunks:
                g_lens = lens if rows is None else [lens[r] for r in rows]
                idx = None if rows is None else torch.tensor(rows, device=tables.device)
                g_tables, g_ctx = (tables, ctx) if idx is None else (tables[idx], ctx[idx])
                L = max(g_lens)
                mask = None
                if min(g_lens) != L:
                    pos = torch.arange(L, device=tables.device)
                    mask = (pos[None, :] < g_ctx[:, None])[:, None, None, :]  # [B, 1, 1, L]
                self.decode_groups.append((idx, L, g_tables[:, : -(-L // self.block_size)].flatten(), mask))
        # Per prefill: (query start, query len, context len, block ids, causal mask or None)
        self.prefills = []
        start = 0
        for i in range(lay.num_prefills):
            ql, cl = lay.query_lens[i], lay.context_lens[i]
            mask = None
            if cl != ql:  # a cached prefix precedes the new tokens
                q_pos = torch.arange(cl - ql, cl, device=lay.block_tables.device)
                mask = torch.arange(cl, device=q_pos.device)[None, :] <= q_pos[:, None]
            blocks = lay.block_tables[i, : -(-cl // self.block_size)].long()
            self.prefills.append((start, ql, cl, blocks, mask))
            start += ql
        self._window_masks: dict[int, tuple[list, list]] = {}

    def _masks(self, window: int | None) -> tuple[list, list]:
        """(per prefill, per decode group) the boolean masks of ``window`` (None: the causal ones above;
        a prefill's None means plain causal over new tokens only)."""
        if window is None:
            return [p[4] for p in self.prefills], [g[3] for g in self.decode_groups]
        if window not in self._window_masks:
            dev = self.layout.block_tables.device
            pre = []
            for _, ql, cl, _, _ in self.prefills:
                q_pos = torch.arange(cl - ql, cl, device=dev)[:, None]
                k_pos = torch.arange(cl, device=dev)[None, :]  # every key of the context (cached or new)
                pre.append((k_pos <= q_pos) & (k_pos > q_pos - window))
            dec = []
            ctx_all = self.layout.context_lens_tensor[self.layout.num_prefills:]
            for idx, L, _, _ in self.decode_groups:
                ctx = ctx_all if idx is None else ctx_all[idx]
                pos = torch.arange(L, device=dev)[None, :]
                dec.append(((pos < ctx[:, None]) & (pos >= ctx[:, None] - window))[:, None, None, :])
            self._window_masks[window] = (pre, dec)
        return self._window_masks[window]

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
        # cache: [num_blocks, block_size, kv_heads, head_dim] -> [length, kv_heads, head_dim]
        return cache.index_select(0, blocks).flatten(0, 1)[:length]

    def attention(self, layer, q, k, v, rotary=None, window=None, softcap=None, scale=None, sinks=None):
        q, k = apply_rotary(q, k, rotary)
        scale = self.scale if scale is None else scale
        cache = self.kv_caches[layer]
        k_cache, v_cache = cache[0], cache[1]
        lay = self.layout
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, lay.slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, lay.slot_mapping, v)
        pre_masks, dec_masks = self._masks(window)
        if not self.prefills and len(self.decode_groups) == 1:  # all decodes, one group: no copy
            _, L, blocks, _ = self.decode_groups[0]
            return self._decode(q, cache, L, blocks, dec_masks[0], scale, softcap, sinks)
        out = torch.empty_like(q)
        for (start, ql, cl, blocks, cached), mask in zip(self.prefills, pre_masks):
            # 4-D [1, H, L, D] inputs: 3-D ones take a slow path in the CPU kernel (15x here).
            qi = q[start:start + ql].transpose(0, 1)[None]
            if cached is None:  # whole context is new: attend to this step's k/v directly
                ki, vi = k[start:start + ql].transpose(0, 1)[None], v[start:start + ql].transpose(0, 1)[None]
            else:
                ki = self._gather(k_cache, blocks, cl).transpose(0, 1)[None]
                vi = self._gather(v_cache, blocks, cl).transpose(0, 1)[None]
            if softcap is None and sinks is None:
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None,
                                                   scale=scale, enable_gqa=True)
            else:
                group = qi.shape[1] // ki.shape[1]
                if mask is None:
                    mask = torch.ones(ql, ql, dtype=torch.bool, device=q.device).tril()
                o = _explicit_attention(qi, ki.repeat_interleave(group, 1), vi.repeat_interleave(group, 1),
                                        mask, scale, softcap, None if sinks is None else sinks.view(1, -1, 1, 1))
            out[start:start + ql] = o[0].transpose(0, 1)
        if self.num_decodes:
            qd_all = q[lay.num_prefill_tokens:]
            out_d = out[lay.num_prefill_tokens:]
            for (idx, L, blocks, _), mask in zip(self.decode_groups, dec_masks):
                qd = qd_all if idx is None else qd_all.index_select(0, idx)
                o = self._decode(qd, cache, L, blocks, mask, scale, softcap, sinks)
                if idx is None:
                    out_d.copy_(o)
                else:
                    out_d.index_copy_(0, idx, o)
        return out

    def _decode(self, qd, cache, L, blocks, mask, scale, softcap=None, sinks=None):
        """Attention of ``B`` one-token queries ([B, H, D]) over their gathered, padded contexts."""
        B, _, d = qd.shape
        kvh = cache.shape[3]
        # The query heads sharing a KV head become that head's query rows ([B, KVH, G, D]): the
        # same products as enable_gqa with a 1-token query, but the CPU kernel runs this shape
        # 1.1x (float32) to 5x (bfloat16) faster.
        qd = qd.reshape(B, kvh, -1, d)
        kv = cache.index_select(1, blocks).view(2, B, -1, kvh, d)[:, :, :L].transpose(2, 3)  # K and V in one gather
        kd, vd = kv[0], kv[1]  # [B, KVH, L, D]
        if softcap is not None or sinks is not None:
            if mask is None:
                mask = torch.ones(1, 1, 1, L, dtype=torch.bool, device=qd.device)
            sinks = None if sinks is None else sinks.view(1, kvh, -1, 1)  # head kvh * G + g sits at [kvh, g]
            return _explicit_attention(qd, kd, vd, mask, scale, softcap, sinks).reshape(B, -1, d)
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale).reshape(B, -1, d)


def _explicit_attention(q, k, v, mask, scale: float, softcap: float | None,
                        sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention with the scores soft-capped as ``softcap * tanh(s / softcap)`` before the mask (Gemma 2) and/or
    a sink logit per head joining each softmax (gpt-oss); SDPA has neither option. ``q``/``k``/``v``:
    [..., L, D] with matching heads; ``mask``: True = attend; ``sinks`` broadcasts to the scores' [..., 1]."""
    s = (q @ k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.softmax(s, dim=-1).to(v.dtype) @ v
    sink = sinks.float().expand(*s.shape[:-1], 1)
    probs = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v
