"""Warm before ready (CUDA): once ``AsyncEngine.start`` returns (what the server awaits before ``/ready``
answers 200), live requests of several shapes compile no Triton kernel, capture no CUDA graph and time no
quantized kernel; the warm-up's own requests leave no trace in the engine's counters or prefix cache; eager
decode steps' bucketed split counts give the same attention bit for bit as the exact ones.

Random weights in SmolLM2's shape stand in where the embedded model is not installed (token-id prompts)."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from servelm.engine import AsyncEngine, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from servelm.engine.attention.triton_backend import eager_num_splits  # noqa: E402
from servelm.engine.attention.triton_kernels import decode_attention, pick_num_splits  # noqa: E402
from servelm.engine.models.config import ModelLoadError  # noqa: E402
from servelm.engine.models.loader import default_model_path, load_model  # noqa: E402
from servelm.engine.warmup import compile_counts  # noqa: E402


@pytest.fixture(scope="module")
def smol_cuda():
    try:
        default_model_path()
    except ModelLoadError:
        return load_model("dummy:smollm2-135m", torch.bfloat16, torch.device("cuda"), 4096)
    return load_model(None, torch.bfloat16, torch.device("cuda"), 4096)


# (prompt tokens, sampling) of the live requests: short and long prompts, each sampler path a client can ask for
LIVE = [(5, SamplingParams(temperature=0.0)), (37, SamplingParams(temperature=0.7, top_p=0.9, seed=1)),
        (300, SamplingParams(temperature=0.7, top_k=50, seed=2)), (900, SamplingParams(temperature=0.0, logprobs=3)),
        (1700, SamplingParams(temperature=0.0, repetition_penalty=1.2, frequency_penalty=0.3)),
        (3000, SamplingParams(temperature=0.9, min_p=0.05, seed=3)), (64, SamplingParams(temperature=0.0, n=2)),
        (120, SamplingParams(temperature=0.0, prompt_logprobs=1)), (16, SamplingParams(temperature=0.0, top_p=0.5))]


async def _serve(engine: AsyncEngine, rng: random.Random) -> None:
    async def one(i, n, params):
        await asyncio.sleep(0.01 * i)  # staggered arrivals: prefills land beside running decodes
        params.max_tokens, params.ignore_eos = 24, True
        ids = [rng.randrange(3, 40000) for _ in range(n)]
        async for _ in engine.generate({"prompt_token_ids": ids}, params, request_id=f"live-{i}"):
            pass

    await asyncio.gather(*(one(i, n, p) for i, (n, p) in enumerate(LIVE * 2)))


def test_first_requests_after_start_compile_nothing(smol_cuda):
    cfg = EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=16, kv_cache_memory_bytes=1 << 30)

    async def run():
        engine = AsyncEngine(cfg, LLMEngine(cfg, loaded=smol_cuda))
        await engine.start()
        try:
            report = engine.warmup_report
            assert report.get("skipped") is None, report
            warm = compile_counts()
            assert warm["triton_compilations"] is not None and warm["cuda_graph_captures"] > 0
            stats = engine.engine.stats()  # the warm-up's requests are not counted as served ones
            assert stats.steps == 0 and stats.prompt_tokens_computed == 0 and stats.prefix_cache_queries == 0
            assert stats.kv_blocks_cached == 0
            await _serve(engine, random.Random(0))
            return warm, compile_counts()
        finally:
            await engine.shutdown()

    warm, after = asyncio.run(run())
    assert after == warm, f"live requests compiled or captured kernels: {warm} -> {after}"


@pytest.mark.parametrize("ctx_lens", [[1], [63, 65], [100, 700, 1500], [4000, 17, 2222]])
def test_bucketed_splits_give_the_same_attention(ctx_lens):
    torch.manual_seed(0)
    H, KVH, D, BS = 9, 3, 64, 16
    blocks = sum(-(-c // BS) for c in ctx_lens)
    k_cache = torch.randn(blocks, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables, start = [], 0
    width = max(-(-c // BS) for c in ctx_lens)
    for c in ctx_lens:
        n = -(-c // BS)
        tables.append(list(range(start, start + n)) + [0] * (width - n))
        start += n
    tables = torch.tensor(tables, dtype=torch.int32, device="cuda")
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(ctx_lens), H, D, device="cuda", dtype=torch.bfloat16)
    exact, bucketed = torch.empty_like(q), torch.empty_like(q)
    n = pick_num_splits(max(ctx_lens))
    decode_attention(q, exact, k_cache, v_cache, tables, ctx, n, D ** -0.5)
    decode_attention(q, bucketed, k_cache, v_cache, tables, ctx, eager_num_splits(max(ctx_lens)), D ** -0.5)
    assert eager_num_splits(max(ctx_lens)) >= n
    assert torch.equal(exact, bucketed)
