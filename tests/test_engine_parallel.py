"""Tensor parallelism: TP=2 computes what TP=1 computes, on a random-weight model whose heads divide by 2.

On the CPU the ranks talk through gloo in float32 (tight tolerance, identical greedy outputs); on a
machine with two GPUs the same comparison runs through NCCL in bfloat16 (bf16 tolerance).
"""
from __future__ import annotations

import pytest
import torch

from servelm.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from servelm.engine.models.config import preset
from servelm.engine.parallel import check_shardable

MODEL = "dummy:tiny"  # 4 heads, 2 KV heads, intermediate 128, vocabulary 49152: all divide by 2
PROMPTS = [[5 + (7 * i + 3 * j) % 4000 for j in range(n)] for i, n in enumerate((3, 17, 40, 9))]


def run(tp: int, device: str, dtype: str, **kw):
    """Per-position logits of each prompt, and greedy outputs for all prompts batched, from one engine."""
    engine = LLMEngine(EngineConfig(model=MODEL, device=device, dtype=dtype, tensor_parallel_size=tp,
                                    kv_cache_memory_bytes=64 << 20, max_num_seqs=4, **kw))
    try:
        logits = [engine.prompt_logits(p).cpu() for p in PROMPTS]
        outs = LLM.from_engine(engine).generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0,
                                                                        ignore_eos=True))
        return logits, [o.outputs[0].token_ids for o in outs]
    finally:
        engine.shutdown()


def test_tp2_matches_tp1_on_cpu_gloo():
    # Chunks of 8 tokens: the 17- and 40-token prompts take steps that sample nothing, where rank 0
    # does not wait for the device, so the step channel must hold it back until the worker has read.
    ref_logits, ref_tokens = run(1, "cpu", "float32", prefill_chunk_size=8)
    tp_logits, tp_tokens = run(2, "cpu", "float32", prefill_chunk_size=8)
    for ref, got in zip(ref_logits, tp_logits):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert all(len(t) == 12 for t in tp_tokens)
    assert tp_tokens == ref_tokens


def _prompt_scores(tp: int):
    engine = LLMEngine(EngineConfig(model=MODEL, device="cpu", dtype="float32", tensor_parallel_size=tp,
                                    kv_cache_memory_bytes=64 << 20, max_num_seqs=4, prefill_chunk_size=8))
    try:
        outs = LLM.from_engine(engine).generate(PROMPTS, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                                        prompt_logprobs=2))
        return [o.prompt_logprobs for o in outs], [o.outputs[0].token_ids for o in outs]
    finally:
        engine.shutdown()


def test_prompt_logprobs_under_tp_match_tp1():
    """Scoring a prompt (echo with logprobs) under TP=2: every rank joins the vocabulary gathers of the scored
    rows, across 8-token prefill chunks, and the scores equal TP=1's."""
    ref, ref_tokens = _prompt_scores(1)
    got, got_tokens = _prompt_scores(2)
    assert got_tokens == ref_tokens
    for r, g, prompt in zip(ref, got, PROMPTS):
        assert len(g) == len(r) == len(prompt) and g[0] is None and r[0] is None
        for a, b in zip(r[1:], g[1:]):
            assert a.chosen.token_id == b.chosen.token_id and abs(a.chosen.logprob - b.chosen.logprob) < 1e-4
            assert [t.token_id for t in a.top] == [t.token_id for t in b.top]


def test_tp_size_must_divide_the_heads():
    with pytest.raises(ValueError, match="does not divide the model's attention heads"):
        check_shardable(preset("smollm2-135m"), 2)  # 9 heads


def test_tp_with_quantization_is_refused_before_loading():
    with pytest.raises(ValueError, match="tensor parallelism does not combine with quantization"):
        LLMEngine(EngineConfig(model=MODEL, device="cpu", tensor_parallel_size=2, quantization="int8"))


def test_dead_worker_is_an_error_not_a_hang():
    engine = LLMEngine(EngineConfig(model=MODEL, device="cpu", tensor_parallel_size=2, kv_cache_memory_bytes=64 << 20))
    try:
        worker = engine.tp.procs[0]
        worker.kill()
        worker.join()
        with pytest.raises(RuntimeError):
            engine.prompt_logits(PROMPTS[1])
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_matches_tp1_on_two_gpus_nccl():
    # Last in this module: an NCCL group stays until the process exits (servelm.engine.parallel), so
    # no other tensor-parallel engine can start in this process after it.
    ref_logits, ref_tokens = run(1, "cuda", "bfloat16")
    tp_logits, tp_tokens = run(2, "cuda", "bfloat16")  # CUDA graphs on: the collectives are captured too
    for ref, got in zip(ref_logits, tp_logits):
        rel = (got - ref).norm() / ref.norm()
        assert rel < 2e-2, f"relative error {rel:.3g} at bf16"
    agree = sum(a == b for r, t in zip(ref_tokens, tp_tokens) for a, b in zip(r, t))
    assert agree >= 0.9 * sum(len(r) for r in ref_tokens)  # bf16 rounding may flip a near-tie, then drift
