"""Continuous batching, chunked prefill, prefix caching, preemption and aborts keep outputs exact."""
from __future__ import annotations

import random

from servelm.engine import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("river mountain code engine paper light music garden market science story window "
             "dragon planet silver coffee winter ocean number theory").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 120))) for _ in range(n)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_batch_invariance_together_one_by_one_and_chunked(make_llm):
    prompts = _prompts(32)
    llm = make_llm(enable_prefix_caching=False)
    together = _tokens(llm.generate(prompts, GREEDY))
    one_by_one = [_tokens(llm.generate([p], GREEDY))[0] for p in prompts]
    chunked = _tokens(make_llm(enable_prefix_caching=False, prefill_chunk_size=16).generate(prompts, GREEDY))
    assert together == one_by_one
    assert together == chunked
    assert all(len(t) == 24 for t in together)


def test_prefix_cache_computes_only_new_tokens(make_llm):
    llm = make_llm()
    tok = llm.tokenizer
    prefix_ids = tok.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 30))[:200]
    a = prefix_ids + tok.encode(" Question one: what did the fox do?", add_special_tokens=False)
    b = prefix_ids + tok.encode(" Question two: which animal was lazy?", add_special_tokens=False)
    eng = llm.engine
    llm.generate([a], GREEDY)
    before = eng.stats()
    out_b = llm.generate([b], GREEDY)[0]
    after = eng.stats()
    cached = (200 // eng.kv.block_size) * eng.kv.block_size
    assert out_b.num_cached_tokens == cached
    assert after.prompt_tokens_computed - before.prompt_tokens_computed == len(b) - cached
    assert after.prefix_cache_hits - before.prefix_cache_hits == cached
    uncached = make_llm(enable_prefix_caching=False).generate([b], GREEDY)[0]
    assert out_b.outputs[0].token_ids == uncached.outputs[0].token_ids


def test_preemption_under_tiny_kv_budget_gives_same_outputs(make_llm):
    prompts = _prompts(12, seed=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = _tokens(make_llm().generate(prompts, params))
    small = make_llm(num_kv_blocks=24)  # 384 tokens of KV for ~12 x 150 tokens of demand
    outs = _tokens(small.generate(prompts, params))
    stats = small.engine.stats()
    assert stats.num_preemptions > 0
    assert outs == reference
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_free == stats.kv_blocks_total


def test_random_aborts_free_the_pool_and_spare_the_others(make_llm):
    llm = make_llm()
    eng = llm.engine
    prompts = _prompts(120, seed=2)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)  # outlives the aborts below
    rng = random.Random(3)
    keep = set(rng.sample(range(120), 20))
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    to_abort = [f"r{i}" for i in range(120) if i not in keep]
    rng.shuffle(to_abort)
    finished = {}
    while eng.has_unfinished_requests():
        for _ in range(rng.randint(0, 8)):
            if to_abort:
                rid = to_abort.pop()
                out = eng.abort_request(rid)
                assert out is not None and out.outputs[0].finish_reason == "abort", rid
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    assert not to_abort
    assert set(finished) == {f"r{i}" for i in keep}
    stats = eng.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    kept = sorted(keep)
    reference = _tokens(llm.generate([prompts[i] for i in kept], params))
    assert [finished[f"r{i}"].outputs[0].token_ids for i in kept] == reference


def test_n_completions_share_prompt_blocks(make_llm):
    llm = make_llm()
    prompt = " ".join(["A long shared prompt about distributed systems and caching."] * 12)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16))[0]
    assert len(out.outputs) == 3
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    n_prompt = len(out.prompt_token_ids)
    assert out.num_cached_tokens == 0
    # siblings 1 and 2 reused every full block of the prompt computed by sibling 0
    assert llm.engine.stats().prompt_tokens_computed <= n_prompt + 2 * (n_prompt % 16 or 16)
