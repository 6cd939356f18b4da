"""Async scheduling (step k+1 launched before step k's tokens are read) changes no output.

On CPU the overlap buys nothing (it is off by default there), but the bookkeeping is the same as on
CUDA, so it is forced on here and compared token for token with the synchronous engine.
"""
from __future__ import annotations

import random

from servelm.engine import SamplingParams

from test_engine_scheduling import _prompts, _tokens


def _run(llm, reqs, arrivals=None, aborts=()):
    """Step ``llm``'s engine over ``reqs`` [(id, prompt, params)]; request i joins at step ``arrivals[i]``."""
    eng = llm.engine
    arrivals = arrivals or [0] * len(reqs)
    finished, step = {}, 0
    while len(finished) + len(aborts) < len(reqs):
        for (rid, prompt, params), at in zip(reqs, arrivals):
            if at == step:
                eng.add_request(rid, prompt, params)
        for rid, at in aborts:
            if at == step:
                assert eng.abort_request(rid).outputs[0].finish_reason == "abort"
        for out in eng.step():
            assert out.request_id not in finished
            if out.finished:
                finished[out.request_id] = out
        step += 1
    stats = eng.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and not eng.has_unfinished_requests()
    return {rid: (o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for rid, o in finished.items()}, stats


def test_async_greedy_outputs_equal_sync_with_stops_arrivals_and_lengths(make_llm):
    prompts = _prompts(10, seed=5)
    reqs = [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=3 + 9 * i, ignore_eos=i % 2 == 0))
            for i, p in enumerate(prompts)]
    arrivals = [0, 0, 0, 2, 5, 9, 9, 20, 31, 40]
    sync, _ = _run(make_llm(), reqs, arrivals)
    # stop on a word each completion really produces, so stop strings end sequences mid-flight
    for i in (1, 4, 7):
        words = sync[f"r{i}"][0].split()
        if len(words) > 3:
            reqs[i][2].stop = [words[len(words) // 2]]
    sync, _ = _run(make_llm(), reqs, arrivals)
    got, stats = _run(make_llm(async_scheduling=True), reqs, arrivals)
    assert got == sync
    assert stats.overlapped_steps > 20
    assert {r for _, _, r in got.values()} >= {"length", "stop"}


def test_async_handles_aborts_and_mixed_sampling_settings(make_llm):
    prompts = _prompts(12, seed=6)
    kinds = [SamplingParams(temperature=0, max_tokens=70, ignore_eos=True),  # outlives the others: overlaps
             SamplingParams(temperature=0, max_tokens=30, logprobs=2),  # needs host work: drains the pipeline
             SamplingParams(temperature=0.8, seed=11, max_tokens=30),
             SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=30),
             SamplingParams(temperature=0, max_tokens=60, ignore_eos=True,  # no host state: overlaps too
                            logit_bias={t: 4.0 for t in (13, 28, 330, 1024)})]
    reqs = [(f"r{i}", p, kinds[i % len(kinds)]) for i, p in enumerate(prompts)]
    arrivals = [0, 0, 0, 0, 3, 3, 8, 8, 8, 15, 15, 20]
    rng = random.Random(7)
    aborts = [(f"r{i}", arrivals[i] + rng.randint(1, 12)) for i in (4, 5, 9)]
    sync, _ = _run(make_llm(), reqs, arrivals, aborts)
    got, stats = _run(make_llm(async_scheduling=True), reqs, arrivals, aborts)
    assert got == sync
    assert stats.overlapped_steps > 0


def test_async_preemption_under_tiny_kv_budget(make_llm):
    prompts = _prompts(8, seed=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = _tokens(make_llm().generate(prompts, params))
    small = make_llm(num_kv_blocks=20, async_scheduling=True)
    assert _tokens(small.generate(prompts, params)) == reference
    stats = small.engine.stats()
    assert stats.num_preemptions > 0 and stats.overlapped_steps > 0
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total
