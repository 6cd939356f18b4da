"""Triton paged attention against the PyTorch reference backend (float32) on fresh random inputs.

Covers block boundaries, GQA ratios, head sizes 64/128, contexts 1-4096, cached prefixes and
mixed prefill + decode batches; also checks every new K/V landed in its slot.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from servelm.engine.attention import BatchLayout  # noqa: E402
from servelm.engine.attention.torch_ref import TorchAttentionBackend  # noqa: E402
from servelm.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEV = torch.device("cuda")


def run_both(seqs, heads, kv_heads, head_dim, block_size, dtype, gen):
    """seqs: [(context_len, query_len)], prefills (query_len > 1) first. Returns (triton out, ref out, caches)."""
    blocks_per = [-(-c // block_size) for c, _ in seqs]
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # scattered blocks catch table indexing bugs
    tables, slots, query_lens, context_lens = [], [], [], []
    for (c, q), nb in zip(seqs, blocks_per):
        table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c - q, c)]
        query_lens.append(q)
        context_lens.append(c)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEV)
    num_prefills = sum(1 for _, q in seqs if q > 1)
    layout = BatchLayout(torch.tensor(slots, device=DEV), query_lens, context_lens, bt, num_prefills,
                         sum(query_lens[:num_prefills]), torch.tensor(context_lens, dtype=torch.int32, device=DEV))
    T = len(slots)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEV, dtype)
    q = torch.randn(T, heads, head_dim, generator=gen).to(DEV, dtype)
    kv = torch.randn(T, 2 * kv_heads * head_dim + 8, generator=gen).to(DEV, dtype)  # strided views, as the model
    k = kv[:, :kv_heads * head_dim].view(T, kv_heads, head_dim)
    v = kv[:, kv_heads * head_dim:2 * kv_heads * head_dim].view(T, kv_heads, head_dim)
    scale = head_dim ** -0.5
    tri_cache = cache.clone()
    out = TritonAttentionBackend().make_context(layout, [tri_cache], scale).attention(0, q, k, v)
    ref_cache = cache.float()
    ref = TorchAttentionBackend().make_context(layout, [ref_cache], scale).attention(0, q.float(), k.float(),
                                                                                      v.float())
    return out, ref, tri_cache, ref_cache


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = [(32, 8, 128), (9, 3, 64), (8, 8, 64), (16, 2, 128), (4, 1, 64), (28, 4, 128)]
BATCHES = {
    "decode_boundaries": [(1, 1), (15, 1), (16, 1), (17, 1), (31, 1), (32, 1), (33, 1)],
    "decode_long": [(4096, 1), (1000, 1), (2049, 1)],
    "prefill_fresh": [(1, 1), (7, 7), (16, 16), (100, 100)],
    "prefill_prefix": [(48, 16), (600, 37), (4096, 129)],
    "mixed": [(300, 300), (1040, 17), (17, 2), (4096, 1), (5, 1), (64, 1), (333, 1)],
    "long_prefill": [(4096, 4096)],
}


@pytest.mark.parametrize(("dtype", "block_size"), [(torch.bfloat16, 16), (torch.bfloat16, 32), (torch.float16, 16)],
                         ids=["bf16-bs16", "bf16-bs32", "fp16-bs16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}")
@pytest.mark.parametrize("batch", list(BATCHES), ids=str)
def test_triton_matches_reference(batch, shape, block_size, dtype):
    gen = torch.Generator().manual_seed(hash((batch, shape, block_size, str(dtype))) & 0xFFFF)
    seqs = BATCHES[batch]
    seqs = [s for s in seqs if s[1] > 1] + [s for s in seqs if s[1] == 1]
    out, ref, tri_cache, ref_cache = run_both(seqs, *shape, block_size, dtype, gen)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < 1e-2, f"relative error {err:.2e} vs the float32 reference"
    assert torch.equal(tri_cache.float(), ref_cache.to(dtype).float()), "new K/V not stored in their slots"


def test_padding_slot_writes_nothing():
    from servelm.engine.attention.triton_kernels import store_kv

    cache = torch.randn(2, 4, 16, 2, 64, device=DEV, dtype=torch.bfloat16)
    before = cache.clone()
    k = torch.randn(3, 2, 64, device=DEV, dtype=torch.bfloat16)
    store_kv(k, k, cache[0], cache[1], torch.tensor([-1, 5, -1], device=DEV))
    changed = (cache != before).any(-1).any(-1).nonzero().tolist()
    assert changed and all(c[1:] == [0, 5] for c in changed)
    assert torch.equal(cache[0, 0, 5], k[1])
