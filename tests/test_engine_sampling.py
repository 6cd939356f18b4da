"""Seeds, stop strings, stop tokens, streaming text integrity, logprobs, penalties and logit bias."""
from __future__ import annotations

import asyncio

import pytest

from servelm.engine import AsyncEngine, InvalidRequestError, SamplingParams
from servelm.engine.detokenizer import detokenize_new_text
from servelm.engine.sequence import Sequence


def test_same_seed_same_text_different_seeds_differ(smol):
    prompt = "Write a short poem about the sea:"
    mk = lambda seed: SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_tokens=32, ignore_eos=True)
    a = smol.generate([prompt], mk(11))[0].outputs[0].text
    # the same seed in a different batch (with other requests around it) gives the same text
    b = smol.generate(["Other request", prompt, "Third one here"], [SamplingParams(max_tokens=20), mk(11),
                                                                     SamplingParams(max_tokens=5)])[1].outputs[0].text
    c = smol.generate([prompt], mk(12))[0].outputs[0].text
    assert a == b
    assert a != c


def test_stop_string_split_across_tokens_is_honoured(smol):
    prompt = "The capital of France is"
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = smol.generate([prompt], greedy)[0].outputs[0]
    tok = smol.tokenizer
    # pick a stop string that starts inside one token and ends inside the next
    pieces = [tok.decode(out.token_ids[:i]) for i in range(len(out.token_ids) + 1)]
    stop = None
    for i in range(2, len(pieces) - 1):
        a, b = pieces[i - 1], pieces[i]
        cur, nxt = b[len(a):], pieces[i + 1][len(b):]
        if len(cur) >= 2 and len(nxt) >= 2 and cur.strip() and nxt.strip():
            stop, start = cur[1:] + nxt[:1], len(a) + 1
            break
    assert stop, "no token boundary found"
    stopped = smol.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                     stop=[stop]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stop not in stopped.text
    assert stopped.text == out.text[:out.text.index(stop)]


def test_stop_token_ids_and_max_tokens(smol):
    out = smol.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    stop_id = out.token_ids[2]
    out2 = smol.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                   stop_token_ids=[stop_id]))[0].outputs[0]
    assert out2.finish_reason == "stop" and out2.stop_reason == stop_id
    assert out2.token_ids[-1] == stop_id and len(out2.token_ids) <= 3


def test_incremental_detokenizer_never_breaks_multibyte_characters(smol):
    tok = smol.tokenizer
    text = "Café ☕ — 日本語のテキスト 😀🎉 naïve Ωmega"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)
    seq = Sequence("t", 0, prompt, SamplingParams(), 0.0, 100)
    pieces = []
    for t in ids:
        seq.token_ids.append(t)
        pieces.append(detokenize_new_text(tok, seq))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert any(p == "" for p in pieces)  # some tokens were held back mid-character


def test_streaming_deltas_are_clean_and_hold_back_stop_prefixes(smol):
    async def run():
        eng = AsyncEngine(engine=smol.engine)
        await eng.start()
        try:
            prompt = "<|im_start|>user\nWrite three Japanese words with emoji.<|im_end|>\n<|im_start|>assistant\n"
            full = smol.generate([prompt], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0]
            text = full.outputs[0].text
            stop = text[len(text) // 2: len(text) // 2 + 3]
            deltas = []
            async for o in eng.generate(prompt, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                                               stop=[stop])):
                deltas.append(o.outputs[0].delta_text)
            return text, stop, deltas, o.outputs[0]
        finally:
            await eng.shutdown()

    text, stop, deltas, final = asyncio.run(run())
    joined = "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)
    assert joined == final.text == text[:text.index(stop)]
    assert stop not in joined


def test_logprobs_are_consistent(smol):
    out = smol.generate(["The sky is"], SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tid, lp in zip(out.token_ids, out.logprobs):
        assert lp.chosen.token_id == tid
        assert len(lp.top) == 3 and lp.top[0].token_id == tid  # greedy picks the most likely token
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert lp.chosen.logprob <= 0
    assert out.cumulative_logprob == pytest.approx(sum(lp.chosen.logprob for lp in out.logprobs))


def test_penalties_change_repetitive_output(smol):
    prompt = "Repeat after me: hello hello hello hello"
    base = smol.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    pen = smol.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                 frequency_penalty=2.0, presence_penalty=2.0))[0].outputs[0]
    rep = smol.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                 repetition_penalty=1.8))[0].outputs[0]
    assert len(set(pen.token_ids)) > len(set(base.token_ids))
    assert len(set(rep.token_ids)) > len(set(base.token_ids))


def test_batched_penalties_equal_transformers_and_openai_formulas_row_by_row():
    """A batch where rows ask for different penalties, biases and min_tokens: each row's processed logits
    equal transformers' RepetitionPenaltyLogitsProcessor and OpenAI's presence/frequency formula applied to
    that row alone, and a row that asks for nothing is untouched."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from servelm.engine.sampling import Sampler
    torch = pytest.importorskip("torch")
    vocab, eos = 50, 0
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=gen) * 3
    specs = [dict(repetition_penalty=1.7), dict(presence_penalty=0.5, frequency_penalty=0.8, logit_bias={7: 5.0}),
             dict(), dict(repetition_penalty=1.2, frequency_penalty=-0.4, min_tokens=9, stop_token_ids=[3])]
    seqs = []
    for i, kw in enumerate(specs):
        s = Sequence(f"r{i}", 0, [5, 6, 6, 9 + i], SamplingParams(max_tokens=20, **kw), 0.0, 20)
        s.token_ids += [6, 11, 11, 11, 12 + i]  # five output tokens
        seqs.append(s)
    out = Sampler({eos})._process(logits.clone(), seqs)
    for i, (s, kw) in enumerate(zip(seqs, specs)):
        want = logits[i:i + 1].clone()
        if (want_bias := kw.get("logit_bias")):
            for t, v in want_bias.items():
                want[0, t] += v
        if "repetition_penalty" in kw:
            want = RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"])(torch.tensor([s.token_ids]), want)
        counts = torch.bincount(torch.tensor(s.output_token_ids), minlength=vocab).float()
        want[0] -= kw.get("frequency_penalty", 0.0) * counts + kw.get("presence_penalty", 0.0) * (counts > 0).float()
        if kw.get("min_tokens", 0) > s.num_output_tokens:
            want[0, [eos, *kw["stop_token_ids"]]] = float("-inf")
        assert torch.equal(out[i], want[0]), i
    assert torch.equal(out[2], logits[2])


def test_logit_bias_forces_bans_and_keeps_batch_mates(smol):
    prompt = "The capital of France is"
    greedy = dict(temperature=0, max_tokens=5, ignore_eos=True)
    base = smol.generate([prompt], SamplingParams(**greedy))[0].outputs[0].token_ids
    banana = smol.tokenizer.encode(" banana", add_special_tokens=False)[0]
    outs = smol.generate([prompt, prompt, prompt], [
        SamplingParams(**greedy, logit_bias={banana: 100.0}),  # +100: chosen at every step
        SamplingParams(**greedy, logit_bias={base[0]: -100.0}),  # -100: the greedy first token is banned
        SamplingParams(**greedy)])  # a batch mate without bias is untouched
    assert outs[0].outputs[0].token_ids == [banana] * 5
    assert outs[1].outputs[0].token_ids[0] != base[0] and base[0] not in outs[1].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == base
    sampled = smol.generate([prompt], SamplingParams(temperature=1.0, seed=3, max_tokens=5, logit_bias={banana: 100.0}))
    assert sampled[0].outputs[0].token_ids == [banana] * 5  # a +100 bias dominates sampling too
    with pytest.raises(InvalidRequestError) as e:
        smol.generate([prompt], SamplingParams(max_tokens=2, logit_bias={smol.engine.model_config.vocab_size: 1.0}))
    assert e.value.param == "logit_bias"


def test_prompt_logprobs_score_every_prompt_token_like_the_scoring_path(smol):
    """prompt_logprobs (vLLM's field): the logprob of each prompt token given the ones before it, equal to a
    log-softmax over the full-prompt logits, whether the prompt is prefilled whole, in 16-token chunks, or
    after another request cached its prefix (which a scoring request must not reuse)."""
    import torch

    eng = smol.engine
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome and"
    ids = eng.tokenizer.encode(prompt)
    ref = torch.log_softmax(eng.prompt_logits(ids), dim=-1)
    smol.generate([prompt], SamplingParams(max_tokens=2))  # its prompt blocks are now cached
    outs = smol.generate([prompt, prompt], [SamplingParams(max_tokens=2, prompt_logprobs=3),
                                            SamplingParams(max_tokens=2, prompt_logprobs=0, n=2)])
    for out in outs:
        lp = out.prompt_logprobs
        assert len(lp) == len(ids) and lp[0] is None
        for i in range(1, len(ids)):
            assert lp[i].chosen.token_id == ids[i]
            assert abs(lp[i].chosen.logprob - ref[i - 1, ids[i]].item()) < 1e-4
    top = outs[0].prompt_logprobs
    for i in range(1, len(ids)):  # the 3 most likely tokens at each position (values: ties may swap ids)
        want = ref[i - 1].topk(3).values.tolist()
        assert all(abs(t.logprob - w) < 1e-4 for t, w in zip(top[i].top, want)) and len(top[i].top) == 3
    assert all(not t.top for t in outs[1].prompt_logprobs[1:])
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids  # generation itself is unchanged
    plain = smol.generate([prompt], SamplingParams(max_tokens=2))[0]
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_survive_chunked_prefill():
    import torch

    from servelm.engine import EngineConfig, LLMEngine

    eng = LLMEngine(EngineConfig(max_num_batched_tokens=48, prefill_chunk_size=16))
    ids = eng.tokenizer.encode("Seven bridges cross the river that runs through the old town, and every one of "
                               "them was built in a different century by a different hand.")
    ref = torch.log_softmax(eng.prompt_logits(ids), dim=-1)
    eng.add_request("a", ids, SamplingParams(max_tokens=1, prompt_logprobs=1))
    eng.add_request("b", ids[:20], SamplingParams(max_tokens=4))
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    lp = done["a"].prompt_logprobs
    assert len(lp) == len(ids) and len(ids) > 16  # at least two chunks
    assert max(abs(lp[i].chosen.logprob - ref[i - 1, ids[i]].item()) for i in range(1, len(ids))) < 1e-4
