"""Reference attention over the paged cache in plain PyTorch; runs anywhere, used on CPU.

Prefills run one sequence at a time through ``scaled_dot_product_attention`` (with an
explicit mask when part of the context is already cached). Decodes run as one batch:
each sequence's blocks are gathered through its block table, padded to the longest
context, and masked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from servelm.engine.attention.base import AttentionBackend, AttentionContext, BatchLayout


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
        self.decode_mask = None
        if self.num_decodes:
            tables = lay.block_tables[lay.num_prefills:].long()  # int32 indexing takes a slow path
            lens = lay.context_lens[lay.num_prefills:]
            self.max_decode_len = max(lens)
            n_blocks = -(-self.max_decode_len // self.block_size)
            self.decode_tables = tables[:, :n_blocks].flatten()
            if min(lens) != self.max_decode_len:
                pos = torch.arange(self.max_decode_len, device=tables.device)
                ctx = lay.context_lens_tensor[lay.num_prefills:]
                self.decode_mask = (pos[None, :] < ctx[:, None])[:, None, None, :]  # [B, 1, 1, L]
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

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
        # cache: [num_blocks, block_size, kv_heads, head_dim] -> [length, kv_heads, head_dim]
        return cache.index_select(0, blocks).flatten(0, 1)[:length]

    def attention(self, layer, q, k, v):
        cache = self.kv_caches[layer]
        k_cache, v_cache = cache[0], cache[1]
        lay = self.layout
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, lay.slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, lay.slot_mapping, v)
        out = torch.empty_like(q)
        for start, ql, cl, blocks, mask in self.prefills:
            # 4-D [1, H, L, D] inputs: 3-D ones take a slow path in the CPU kernel (15x here).
            qi = q[start:start + ql].transpose(0, 1)[None]
            if mask is None:  # whole context is new: attend to this step's k/v directly
                ki, vi = k[start:start + ql].transpose(0, 1)[None], v[start:start + ql].transpose(0, 1)[None]
            else:
                ki = self._gather(k_cache, blocks, cl).transpose(0, 1)[None]
                vi = self._gather(v_cache, blocks, cl).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale, enable_gqa=True)
            out[start:start + ql] = o[0].transpose(0, 1)
        if self.num_decodes:
            p = lay.num_prefill_tokens
            B, L = self.num_decodes, self.max_decode_len
            qd = q[p:].unsqueeze(2)  # [B, H, 1, D]; kd, vd below: [B, KVH, L, D]
            kd = k_cache.index_select(0, self.decode_tables).view(B, -1, *k.shape[1:])[:, :L].transpose(1, 2)
            vd = v_cache.index_select(0, self.decode_tables).view(B, -1, *v.shape[1:])[:, :L].transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask, scale=self.scale,
                                               enable_gqa=True)
            out[p:] = o.squeeze(2)
        return out
