"""A short prefill computed as decode rows (one query per token over its own causal context) is the prefill.

The CUDA path runs prefills of up to ``SHORT_PREFILL`` tokens this way (so a prefix-cache hit replays
the decode CUDA graph); here the PyTorch reference backend checks the two layouts agree.
"""
from __future__ import annotations

import torch

from servelm.engine.attention import BatchLayout, TorchAttentionBackend
from servelm.engine.attention.base import SHORT_PREFILL, as_decode_rows, short_prefill_rows


def test_prefill_as_decode_rows_matches_prefill():
    g = torch.Generator().manual_seed(0)
    bs, heads, kv_heads, d = 4, 4, 2, 16
    be = TorchAttentionBackend()
    cache = be.allocate_kv_cache(1, 32, bs, kv_heads, d, torch.float32, torch.device("cpu"))
    cache[0].normal_(generator=g)
    # a 5-token prefill behind a 7-token cached prefix, a fresh 3-token prompt, a decode at context 10
    q_lens, ctx_lens = [5, 3, 1], [12, 3, 10]
    tables = torch.tensor([[0, 1, 2, 0], [3, 0, 0, 0], [4, 5, 6, 0]], dtype=torch.int32)
    slots = [t[p // bs] * bs + p % bs for t, n, c in zip(tables.tolist(), q_lens, ctx_lens) for p in range(c - n, c)]
    lay = BatchLayout(torch.tensor(slots), q_lens, ctx_lens, tables, 2, 8, torch.tensor(ctx_lens, dtype=torch.int32))
    t = sum(q_lens)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (heads, kv_heads, kv_heads))
    c_prefill, c_rows = [cache[0].clone()], [cache[0].clone()]
    ref = be.make_context(lay, c_prefill, 0.25).attention(0, q, k, v)
    rows = as_decode_rows(lay)
    assert rows.num_prefills == 0 and rows.context_lens == [8, 9, 10, 11, 12, 1, 2, 3, 10]
    got = be.make_context(rows, c_rows, 0.25).attention(0, q, k, v)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(c_rows[0], c_prefill[0])
    assert short_prefill_rows(lay)
    long = BatchLayout(lay.slot_mapping, [SHORT_PREFILL + 1], [SHORT_PREFILL + 1], tables[:1], 1, SHORT_PREFILL + 1,
                       lay.context_lens_tensor[:1])
    assert not short_prefill_rows(long)
