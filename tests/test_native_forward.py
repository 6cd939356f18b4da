"""The native CPU forward (one call per step over GGUF blocks and the paged KV cache) against the
PyTorch model on the same blocks: prefill, chunked prefill with a cached prefix, mixed batches, batch
invariance bitwise, and the engine's scheduling on the native path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from servelm.engine import native
from servelm.engine.attention.base import BatchLayout
from servelm.engine.attention.torch_ref import TorchAttentionBackend
from servelm.engine.models.config import preset
from servelm.engine.models.gguf_random import write_random_gguf
from servelm.engine.models.loader import load_model
from servelm.engine.native.forward import native_forward_for

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler to build the native kernels")

BLOCK = 16
NUM_BLOCKS = 32


def _cfg(arch: str):
    base = preset("tiny")
    return dataclasses.replace(base, name=f"tiny-{arch}", arch=arch, vocab_size=512, hidden_size=256,
                               intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                               attention_bias=arch == "qwen2", qk_norm=arch == "qwen3", tie_word_embeddings=False)


@pytest.fixture(scope="module", params=[("llama", "Q4_K"), ("llama", "Q4_0"), ("llama", "Q8_0")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request, tmp_path_factory):
    arch, qtype = request.param
    path = write_random_gguf(tmp_path_factory.mktemp("g") / f"{arch}.gguf", _cfg(arch), qtype,
                             types={"blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_v.weight": "Q5_1"}, scale=0.05)
    m = load_model(path, torch.float32, torch.device("cpu"), gguf_blocks=True).model
    return m.eval()


def _caches(m):
    cfg = m.config
    return TorchAttentionBackend().allocate_kv_cache(cfg.num_layers, NUM_BLOCKS, BLOCK, cfg.num_kv_heads,
                                                     cfg.head_dim, torch.float32, "cpu")


def _layout(seqs):
    """seqs: (block ids, cached tokens, new tokens); prefills (new > 1) must come first."""
    slots, qlens, clens, tables, positions = [], [], [], [], []
    width = max(len(b) for b, _, _ in seqs)
    for blocks, cached, new in seqs:
        for p in range(cached, cached + new):
            slots.append(blocks[p // BLOCK] * BLOCK + p % BLOCK)
            positions.append(p)
        qlens.append(new)
        clens.append(cached + new)
        tables.append(blocks + [0] * (width - len(blocks)))
    npre = sum(1 for _, _, n in seqs if n > 1)
    lay = BatchLayout(slot_mapping=torch.tensor(slots), query_lens=qlens, context_lens=clens,
                      block_tables=torch.tensor(tables, dtype=torch.int32), num_prefills=npre,
                      num_prefill_tokens=sum(qlens[:npre]), context_lens_tensor=torch.tensor(clens, dtype=torch.int32))
    return lay, torch.tensor(positions)


@torch.inference_mode()
def _run(m, caches, seqs, ids, use_native):
    lay, pos = _layout(seqs)
    ids = torch.tensor(ids)
    if use_native:
        return native_forward_for(m, caches, torch.device("cpu"))(ids, pos, lay)
    return m(ids, pos, TorchAttentionBackend().make_context(lay, caches, m.config.head_dim ** -0.5))


def _close(a, b, tol=3e-2):
    err = ((a - b).norm() / b.norm()).item()
    assert err < tol, f"relative difference {err:.3e}"


def _ids(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_used_for_gguf_blocks_on_cpu(model):
    assert native_forward_for(model, _caches(model), torch.device("cpu")) is not None


def test_prefill_matches_torch_model(model):
    ids = _ids(40, 0)
    seqs = [([0, 1, 2], 0, 40)]
    nat, ref = _run(model, _caches(model), seqs, ids, True), _run(model, _caches(model), seqs, ids, False)
    _close(nat, ref)


def test_chunked_prefill_over_cached_prefix(model):
    ids = _ids(40, 1)
    whole = _run(model, _caches(model), [([0, 1, 2], 0, 40)], ids, False)
    for use_native in (True, False):
        caches = _caches(model)
        first = _run(model, caches, [([0, 1, 2], 0, 24)], ids[:24], use_native)
        rest = _run(model, caches, [([0, 1, 2], 24, 16)], ids[24:], use_native)
        _close(torch.cat([first, rest]), whole)


def test_mixed_batch_matches_torch_and_is_batch_invariant(model):
    a, b, c = _ids(20, 2), _ids(9, 3), _ids(33, 4)
    tables = {"a": [0, 1], "b": [2], "c": [3, 4, 5]}
    outs = {}
    for use_native in (True, False):
        caches = _caches(model)
        # prompts of b and c first, each alone
        _run(model, caches, [(tables["b"], 0, 8)], b[:8], use_native)
        _run(model, caches, [(tables["c"], 0, 32)], c[:32], use_native)
        # one step: a prefills in chunk, b and c decode a token each
        mixed = _run(model, caches, [(tables["a"], 0, 20), (tables["b"], 8, 1), (tables["c"], 32, 1)],
                     a + [b[8], c[32]], use_native)
        outs[use_native] = mixed
        if use_native:
            # the same rows computed alone (their cache entries rewritten with the same values)
            alone_b = _run(model, caches, [(tables["b"], 8, 1)], [b[8]], True)
            alone_c = _run(model, caches, [(tables["c"], 32, 1)], [c[32]], True)
            alone_a = _run(model, caches, [(tables["a"], 0, 20)], a, True)
            assert torch.equal(mixed[20], alone_b[0]) and torch.equal(mixed[21], alone_c[0])
            assert torch.equal(mixed[:20], alone_a)
    _close(outs[True], outs[False])


def test_thread_count_does_not_change_results(model):
    ids = _ids(24, 5)
    seqs = [([0, 1], 0, 24)]
    try:
        native.set_num_threads(1)
        one = _run(model, _caches(model), seqs, ids, True)
        native.set_num_threads(3)
        three = _run(model, _caches(model), seqs, ids, True)
    finally:
        native.set_num_threads(native.default_num_threads())
    assert torch.equal(one, three)
