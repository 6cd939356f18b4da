"""A quantized GGUF on CUDA: Q4_0/Q4_1 matrices load into the int4 GPU kernels (never a float copy of them),
other block types are dequantized to bf16 tensor by tensor, and the logits agree with the all-bf16 load."""
from __future__ import annotations

import pytest
import torch

from servelm.engine.attention import TorchAttentionBackend
from servelm.engine.memory import profile_layout
from servelm.engine.models.config import preset
from servelm.engine.models.gguf_random import write_random_gguf
from servelm.engine.models.loader import load_model
from servelm.engine.quant.int4 import Int4Linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    dev = ids.device
    layout, positions, blocks = profile_layout([ids.numel()], 16, dev)
    backend = TorchAttentionBackend()
    caches = backend.allocate_kv_cache(cfg.num_layers, blocks, 16, cfg.num_kv_heads, cfg.head_dim,
                                       torch.bfloat16, dev)
    with torch.inference_mode():
        hidden = model(ids, positions, backend.make_context(layout, caches, cfg.head_dim ** -0.5))
        return model.compute_logits(hidden).float()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_gguf_runs_in_int4_kernels_and_matches_bf16(tmp_path, qtype):
    cfg = preset("smollm2-135m")
    cfg.num_layers = 4
    # as in a Q4_K_M-style file, one matrix per layer in another type: that one is dequantized to bf16
    types = {f"blk.{i}.ffn_down.weight": "Q6_K" for i in range(cfg.num_layers)}
    types["token_embd.weight"] = "Q8_0"
    path = write_random_gguf(tmp_path / f"m-{qtype}.gguf", cfg, qtype, types=types)
    dev = torch.device("cuda")
    blocks = load_model(path, torch.bfloat16, dev, gguf_blocks=True).model
    ref = load_model(path, torch.bfloat16, dev).model
    layer = blocks.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and isinstance(layer.mlp.gate_up_proj, Int4Linear)
    assert isinstance(layer.mlp.down_proj, torch.nn.Linear)  # the Q6_K matrix, in bf16
    ids = torch.randint(0, cfg.vocab_size, (48,), device=dev, generator=torch.Generator(dev).manual_seed(0))
    got, want = _logits(blocks, ids), _logits(ref, ids)
    rel = (got - want).norm() / want.norm()
    # the same weights up to the int4 layout's bf16 scales; bf16 activations either way
    assert rel < 2e-2, f"relative logit error {rel:.4f}"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
