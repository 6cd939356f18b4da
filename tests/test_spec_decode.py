"""Speculative decoding (n-gram prompt lookup): the output is exactly the target model's.

Greedy: token for token equal to decoding without speculation, also under forced preemption, chunked
prefill and a token budget smaller than the proposals; logprobs equal; the KV pool is free afterwards.
Sampled: the next-token distribution with speculation is the target's (chi-square over 20k draws on a
tiny random model).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import chisquare

from servelm.engine import LLM, LLMEngine, EngineConfig
from servelm.engine.models.config import ModelConfig
from servelm.engine.models.loader import LoadedModel, _dummy_model
from servelm.engine.sampling_params import SamplingParams
from servelm.engine.sequence import Sequence
from servelm.engine.speculative import NgramProposer, SpeculativeConfig
from servelm.engine.speculative.verify import verify
from servelm.server.admission import Admission
from servelm.server.metrics import Metrics

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)

_QUOTE = ("The warranty covers parts and labour for two years from the date of purchase. Batteries are covered "
          "for one year. Damage caused by water or misuse is not covered.")
PROMPTS = [
    *[f"Context: {_QUOTE}\nQuestion: how long are {w} covered? Quote the context.\nAnswer:" for w in
      ("parts", "batteries", "labour", "repairs")],
    *[f"{' '.join(str(i) for i in range(s, s + 12))} {' '.join(str(i) for i in range(s, s + 4))}" for s in range(6)],
    *[f"def {n}(x):\n    return x * {i}\n\ndef {n}_twice(x):\n    return" for i, n in
      enumerate(("double", "triple", "scale", "grow"))],
    *[f"Repeat after me: {w} {w} {w} {w}" for w in ("red apple", "blue sky", "green grass", "hello world")],
    "Tell me a short story about a cat.", "What is the capital of France?", "Write a haiku about rain.",
    "Explain gravity in one sentence.", "List three colours.", "Why is the sea salty?",
    "Translate 'good morning' into Spanish.", "Name a famous scientist.",
    "a b c d e f g a b c d e f g a b c", "one, two, three, one, two, three, one,",
    "<p>item</p><p>item</p><p>item</p><p>", "SELECT name FROM users; SELECT name FROM",
    "Summarise: the meeting moved to Tuesday. Summary: the meeting", "Hi!",
]


def spec(k: int, **kw) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "disable_by_batch_size": 64, **kw}


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def baseline(make_llm):
    return _tokens(make_llm().generate(PROMPTS, GREEDY))


# k = 1..5, each with another way the scheduler cuts the step: plain, preemption forced (a pool too small
# for the batch), chunked prefill forced, both, and a token budget smaller than the batch's proposals
@pytest.mark.parametrize("k,settings", [
    (1, {}),
    (2, {"num_kv_blocks": 40}),
    (3, {"prefill_chunk_size": 8, "enable_prefix_caching": False}),
    (4, {"num_kv_blocks": 40, "prefill_chunk_size": 8}),
    (5, {"max_num_batched_tokens": 40}),
])
def test_greedy_speculation_equals_plain_decoding(make_llm, baseline, k, settings):
    llm = make_llm(speculative_config=spec(k), **settings)
    assert len(PROMPTS) == 32
    assert _tokens(llm.generate(PROMPTS, GREEDY)) == baseline
    s = llm.engine.stats()
    assert s.spec_num_accepted_tokens > 0 and s.spec_num_draft_tokens >= s.spec_num_accepted_tokens
    assert s.spec_num_emitted_tokens == s.spec_num_accepted_tokens + s.spec_num_drafts
    if "num_kv_blocks" in settings:
        assert s.num_preemptions > 0
    assert s.kv_blocks_used == 0 and s.kv_blocks_free == s.kv_blocks_total


def test_logprobs_equal_plain_decoding(make_llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3)
    prompts = PROMPTS[:8]
    plain = make_llm().generate(prompts, params)
    fast = make_llm(speculative_config=spec(4)).generate(prompts, params)
    for a, b in zip(plain, fast):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.chosen.token_id == y.chosen.token_id and x.chosen.rank == y.chosen.rank
            assert x.chosen.logprob == pytest.approx(y.chosen.logprob, abs=1e-4)
            assert [t.token_id for t in x.top] == [t.token_id for t in y.top]
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-3)


def test_stop_strings_and_max_tokens_as_without_speculation(make_llm):
    plain, fast = make_llm(), make_llm(speculative_config=spec(5))
    prompt = PROMPTS[4]  # counting: the proposals are accepted in long runs
    text = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text
    stop = text.split()[3]
    for params in (SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
                   SamplingParams(temperature=0.0, max_tokens=3), SamplingParams(temperature=0.0, max_tokens=7)):
        a, b = plain.generate([prompt], params)[0].outputs[0], fast.generate([prompt], params)[0].outputs[0]
        assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
        assert len(b.token_ids) <= params.max_tokens
    assert fast.engine.stats().spec_num_accepted_tokens > 0


def test_seeded_sampling_is_reproducible_and_opt_out_skips_speculation(make_llm):
    llm = make_llm(speculative_config=spec(4))
    params = SamplingParams(temperature=0.8, max_tokens=16, seed=7, n=2)
    first = [o.token_ids for o in llm.generate(PROMPTS[4:6], params)[0].outputs]
    again = [o.token_ids for o in llm.generate(PROMPTS[4:6], params)[0].outputs]
    assert first == again and first[0] != first[1]
    before = llm.engine.stats().spec_num_draft_tokens
    llm.generate(PROMPTS[4:6], SamplingParams(temperature=0.0, max_tokens=16, speculative=False))
    assert llm.engine.stats().spec_num_draft_tokens == before
    assert llm.engine.stats().kv_blocks_used == 0


def test_large_batch_turns_speculation_off(make_llm):
    llm = make_llm(speculative_config=spec(4, disable_by_batch_size=4))
    llm.generate(PROMPTS[4:12], GREEDY)  # 8 running sequences: more than 4
    assert llm.engine.stats().spec_num_draft_tokens == 0
    llm.generate(PROMPTS[4:6], GREEDY)
    assert llm.engine.stats().spec_num_draft_tokens > 0


def test_ngram_proposer_prefers_longest_match():
    p = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3))
    assert p.propose_one([1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3], 3) == [9, 9, 2]  # "1 2 3" beats the later "2 3"
    assert p.propose_one([5, 6, 1, 7, 1], 3) == [7, 1]  # the most recent "1", cut at the sequence's end
    assert p.propose_one([1, 2, 3, 4], 3) == []
    assert p.propose_one([1, 2, 1, 2], 0) == []


@pytest.mark.parametrize("bad,message", [
    ({"method": "eagle9"}, "method 'eagle9' is not supported"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "must not exceed"),
    ({"method": "ngram", "draft_tensor_parallel_size": 1}, "key 'draft_tensor_parallel_size' is not supported"),
    ("{not json", "not valid JSON"),
])
def test_bad_speculative_config_fails_at_start(make_llm, bad, message):
    with pytest.raises(ValueError, match=message):
        make_llm(speculative_config=bad)


def _tiny_engine(speculative_config=None, draft_loaded=None) -> LLMEngine:
    """A 2-layer random model with a 64-token vocabulary: its distributions are cheap to sample 20k times."""
    cfg = ModelConfig(name="tiny64", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    loaded = LoadedModel(_dummy_model(cfg, torch.float32, torch.device("cpu"), 3), cfg, None)
    with torch.no_grad():  # sharper than random init, so the draws are far from uniform
        loaded.model.lm_head.weight.mul_(4.0)
    return LLMEngine(EngineConfig(device="cpu", dtype="float32", skip_tokenizer_init=True, max_num_seqs=1024,
                                  kv_cache_memory_bytes=64 << 20, speculative_config=speculative_config),
                     loaded=loaded, draft_loaded=draft_loaded)


def test_sampled_distribution_equals_target_chi_square():
    """20k verifications of the same proposals against the tiny model's logits at those positions (computed
    through the engine's paged path): each emitted token is distributed as the target's sampling distribution."""
    engine = _tiny_engine()
    prompt, drafts = [20, 9, 12, 13, 40, 41, 42, 43], [9, 12]
    bias = {9: 3.0, 12: 3.0}  # give both proposals a fair chance to be accepted and to be rejected
    params = SamplingParams(temperature=0.8, top_k=40, max_tokens=8, logit_bias=bias)
    logits = engine.prompt_logits(prompt + drafts)[-3:]  # after the prompt, after draft 1, after draft 2
    n = 20_000
    seqs = [Sequence(f"s{i}", 0, prompt, params, 0.0, 8) for i in range(n)]
    for s in seqs:
        s.spec_token_ids = list(drafts)
    out = verify(engine.runner.sampler, logits.repeat(n, 1), seqs).token_ids
    assert all(1 <= len(t) <= 3 and t[:len(t) - 1] == drafts[:len(t) - 1] for t in out)

    def target(row):  # the target's sampling distribution at ``row``, computed here without the sampler
        z = logits[row].clone()
        for t, b in bias.items():
            z[t] += b
        z /= 0.8
        return torch.softmax(z.masked_fill(z < z.topk(40).values[-1], float("-inf")), dim=-1)

    def check(samples, p):
        counts = torch.bincount(torch.tensor(samples), minlength=64).double()
        assert counts[p == 0].sum() == 0  # nothing outside the top-k
        keep = p > 0
        expected = p[keep].double() * len(samples)
        assert chisquare(counts[keep], expected / expected.sum() * counts[keep].sum()).pvalue > 0.01

    check([t[0] for t in out], target(0))  # draft 1 accepted, or a residual draw
    second = [t[1] for t in out if len(t) > 1]  # draft 1 accepted: draft 2 accepted, or a residual draw
    assert 2000 < len(second) < n
    check(second, target(1))
    third = [t[2] for t in out if len(t) > 2]  # both accepted: the bonus token
    assert len(third) > 1000
    check(third, target(2))


def test_serve_refuses_a_bad_speculative_config_before_the_model_loads(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "servelm.server", "serve", "--port", "0", "--no-auth",
                        "--data-dir", str(tmp_path), "--speculative-config", '{"method": "medusa9"}'],
                       capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode != 0
    assert "speculative_config method 'medusa9' is not supported; choose one of" in p.stderr
    assert "engine ready" not in p.stderr + p.stdout


def test_prometheus_counters_move_on_a_speculating_request(make_llm):
    llm = make_llm(speculative_config=spec(3))
    metrics = Metrics(llm.engine, Admission(4, 4), model_name=lambda: "smol")

    def scrape() -> dict[str, float]:
        return {(s.name, s.labels.get("position")): s.value for fam in text_string_to_metric_families(
                metrics.render().decode()) for s in fam.samples if s.labels.get("model_name") == "smol"}

    before = scrape()
    assert before[("vllm:spec_decode_num_drafts_total", None)] == 0
    llm.generate(PROMPTS[4:6], GREEDY)
    after = scrape()
    drafts, proposed, accepted = (after[(f"vllm:spec_decode_num_{n}_total", None)]
                                  for n in ("drafts", "draft_tokens", "accepted_tokens"))
    per_pos = [after[("vllm:spec_decode_num_accepted_tokens_per_pos_total", str(j))] for j in range(3)]
    assert drafts > 0 and proposed >= accepted > 0
    assert sum(per_pos) == accepted and per_pos[0] >= per_pos[1] >= per_pos[2]  # a later proposal needs the earlier



# -------------------------------------------------------------------------------- draft model
def _first_layers(loaded: LoadedModel, n: int) -> LoadedModel:
    """A draft made of the target's first ``n`` layers (shared, not copied): a cheap model of the same
    vocabulary whose guesses are often, not always, the target's."""
    cfg = dataclasses.replace(loaded.config, num_layers=n)
    model = copy.copy(loaded.model)
    model._modules = dict(loaded.model._modules)
    model.layers = torch.nn.ModuleList(list(loaded.model.layers)[:n])
    model.config = cfg
    return LoadedModel(model, cfg, None)


@pytest.fixture(scope="module")
def draft_llm(smol_loaded):
    draft = _first_layers(smol_loaded, 10)

    def make(k: int, **settings) -> LLM:
        if "num_kv_blocks" not in settings:
            settings.setdefault("kv_cache_memory_bytes", 256 << 20)
        cfg = EngineConfig(dtype="float32", device="cpu", speculative_config={
            "model": "smollm2-first-10-layers", "num_speculative_tokens": k, "disable_by_batch_size": 64}, **settings)
        return LLM.from_engine(LLMEngine(cfg, loaded=smol_loaded, draft_loaded=draft))
    return make


# fewer prompts than the n-gram tests: each step also runs the draft k times on the torch path
@pytest.mark.parametrize("k,settings", [
    (2, {"num_kv_blocks": 24, "prefill_chunk_size": 8}),
    (5, {"max_num_batched_tokens": 40}),
])
def test_greedy_draft_model_speculation_equals_plain_decoding(draft_llm, baseline, k, settings):
    llm = draft_llm(k, **settings)
    assert _tokens(llm.generate(PROMPTS[:10], GREEDY)) == baseline[:10]
    s = llm.engine.stats()
    assert s.spec_num_draft_tokens > s.spec_num_accepted_tokens > 0  # the draft differs, and is often right
    if "num_kv_blocks" in settings:
        assert s.num_preemptions > 0
    assert s.kv_blocks_used == 0 and s.kv_blocks_free == s.kv_blocks_total
    draft_kv = llm.engine.proposer.kv.stats()
    assert draft_kv.used == 0  # the draft's own pool is free once its sequences finished


def test_draft_model_of_another_vocabulary_fails_at_start(smol_loaded):
    other = _tiny_engine().loaded  # 64 tokens
    with pytest.raises(ValueError, match="has a vocabulary of 64 tokens and the target model 49152"):
        LLMEngine(EngineConfig(dtype="float32", device="cpu", kv_cache_memory_bytes=64 << 20,
                               speculative_config={"model": "tiny64", "num_speculative_tokens": 2}),
                  loaded=smol_loaded, draft_loaded=other)
    with pytest.raises(ValueError, match='"draft_model" needs "model"'):
        SpeculativeConfig.parse({"method": "draft_model"})


def test_sampled_draft_model_speculation_keeps_the_target_distribution():
    """20k requests of 3 tokens each through the engine, a random draft of the same vocabulary proposing
    tokens 2 and 3: the marginal distribution of each emitted token is the target's (computed exactly
    from the target's logits over every top-k path)."""
    target = _tiny_engine()
    draft = _tiny_engine().loaded
    draft = LoadedModel(_dummy_model(draft.config, torch.float32, torch.device("cpu"), 11), draft.config, None)
    engine = _tiny_engine({"model": "tiny64-seed11", "num_speculative_tokens": 2, "disable_by_batch_size": 4096},
                          draft_loaded=draft)
    prompt, n, top_k = [20, 9, 12, 13, 40, 41, 42, 43], 20_000, 8
    params = SamplingParams(temperature=0.8, top_k=top_k, max_tokens=3, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"r{i}", prompt, params)
    out = []
    while engine.has_unfinished_requests():
        out += [o.outputs[0].token_ids for o in engine.step() if o.finished]
    assert len(out) == n and all(len(t) == 3 for t in out)
    s = engine.stats()
    # sampled requests do not verify a draft model's guesses (docs/speculative.md): their output is the
    # target's distribution because none are proposed
    assert s.spec_num_draft_tokens == 0 and s.kv_blocks_used == 0

    def dist(prefix):  # the target's sampling distribution after ``prefix``
        z = target.prompt_logits(prefix)[-1] / 0.8
        return torch.softmax(z.masked_fill(z < z.topk(top_k).values[-1], float("-inf")), dim=-1).double()

    p1 = dist(prompt)
    p2 = torch.zeros(64, dtype=torch.float64)
    p3 = torch.zeros(64, dtype=torch.float64)
    for a in torch.nonzero(p1).flatten().tolist():
        pa = dist(prompt + [a])
        p2 += p1[a] * pa
        for b in torch.nonzero(pa).flatten().tolist():
            p3 += p1[a] * pa[b] * dist(prompt + [a, b])
    for j, p in enumerate((p1, p2, p3)):
        counts = torch.bincount(torch.tensor([t[j] for t in out]), minlength=64).double()
        assert counts[p == 0].sum() == 0
        keep = p > 0
        assert chisquare(counts[keep], p[keep] / p[keep].sum() * n).pvalue > 0.01, j


# -------------------------------------------------------------------------------- native CPU forward
@pytest.fixture(scope="module")
def native_llm():
    """Engines over the embedded GGUF in its own Q4_1 blocks: every step runs the native CPU forward."""
    from servelm.engine import native
    from servelm.engine.models.loader import load_model

    if not native.available():
        pytest.skip("no C++ compiler to build the native kernels")
    loaded = load_model(None, torch.float32, torch.device("cpu"), gguf_blocks=True)

    def make(**kwargs) -> LLM:
        kwargs.setdefault("kv_cache_memory_bytes", 256 << 20)
        engine = LLMEngine(EngineConfig(dtype="float32", device="cpu", **kwargs), loaded=loaded)
        assert engine.runner.native_forward is not None
        return LLM.from_engine(engine)
    return make


def test_greedy_speculation_on_the_native_forward_equals_plain_decoding(native_llm):
    """Verification rows (k + 1 query tokens after a cached context) go through the native forward as
    chunked-prefill rows do; the tokens are those of plain native decoding."""
    plain = _tokens(native_llm().generate(PROMPTS, GREEDY))
    for k, settings in ((4, {}), (2, {"num_kv_blocks": 40, "prefill_chunk_size": 8})):
        llm = native_llm(speculative_config=spec(k), **settings)
        assert _tokens(llm.generate(PROMPTS, GREEDY)) == plain, k
        s = llm.engine.stats()
        assert s.spec_num_accepted_tokens > 0 and s.kv_blocks_used == 0
