"""The KV profiling pass's batch layout (runs on CPU through the reference backend) and, on CUDA, the budget."""
from __future__ import annotations

import pytest
import torch

from servelm.engine.attention import TorchAttentionBackend
from servelm.engine.memory import profile_layout
from servelm.engine.models.loader import load_model


def test_profile_layout_packs_independent_prompts():
    cpu = torch.device("cpu")
    model = load_model("dummy:tiny", torch.float32, cpu).model
    cfg = model.config
    lens = [40, 40, 9, 1]
    layout, positions, blocks = profile_layout(lens, 16, cpu)
    assert layout.num_prefills == 3 and layout.num_prefill_tokens == 89 and blocks == 4 * 3
    assert layout.slot_mapping.unique().numel() == sum(lens)
    backend = TorchAttentionBackend()
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),))
    caches = backend.allocate_kv_cache(cfg.num_layers, blocks, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, cpu)
    with torch.inference_mode():
        packed = model(ids, positions, backend.make_context(layout, caches, cfg.head_dim ** -0.5))
        start = 0
        for n in lens:  # each prompt alone gives the same hidden states
            lay, pos, b = profile_layout([n], 16, cpu)
            c = backend.allocate_kv_cache(cfg.num_layers, b, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32, cpu)
            alone = model(ids[start:start + n], pos, backend.make_context(lay, c, cfg.head_dim ** -0.5))
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-4, atol=1e-5)
            start += n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kv_budget_follows_utilization():
    from servelm.engine import EngineConfig, LLMEngine

    small = LLMEngine(EngineConfig(model="dummy:tiny", gpu_memory_utilization=0.2, enforce_eager=True))
    n_small = small.kv.num_blocks
    del small
    torch.cuda.empty_cache()
    big = LLMEngine(EngineConfig(model="dummy:tiny", gpu_memory_utilization=0.4, enforce_eager=True))
    assert big.kv.num_blocks > 1.5 * n_small
