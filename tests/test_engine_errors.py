"""Bad input gets a clear error naming the field or file; the engine keeps serving others."""
from __future__ import annotations

import asyncio

import gguf
import numpy as np
import pytest

from servelm.engine import LLM, AsyncEngine, InvalidRequestError, ModelLoadError, RequestFailedError, SamplingParams


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1), "temperature"),
    (dict(n=0), "n"), (dict(logprobs=50), "logprobs"), (dict(stop=[""]), "stop"),
    (dict(logit_bias={5: 101.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
])
def test_bad_sampling_params_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_empty_and_too_long_prompts(smol):
    with pytest.raises(InvalidRequestError, match="empty") as e:
        smol.generate([""])
    assert e.value.param == "prompt"
    n = smol.engine.max_model_len
    with pytest.raises(InvalidRequestError) as e:
        smol.generate([[1] * (n + 5)])
    assert str(n + 5) in str(e.value) and str(n) in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        smol.generate(["Hello"], SamplingParams(max_tokens=n))
    assert e.value.param == "max_tokens"
    assert not smol.engine.has_unfinished_requests()


def test_missing_model_path():
    with pytest.raises(ModelLoadError, match="/no/such/model.gguf"):
        LLM(model="/no/such/model.gguf")


def test_gguf_of_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"gpt2\.gguf.*unsupported architecture 'gpt2'"):
        LLM(model=str(path))


def test_bad_request_does_not_disturb_others(smol):
    async def run():
        eng = AsyncEngine(engine=smol.engine)
        await eng.start()
        try:
            async def good():
                async for o in eng.generate("Count: one, two,", SamplingParams(temperature=0, max_tokens=12)):
                    pass
                return o

            async def bad():
                with pytest.raises(InvalidRequestError):
                    async for _ in eng.generate("", SamplingParams()):
                        pass

            task = asyncio.create_task(good())
            await bad()
            out = await task
            return out, eng.stats()
        finally:
            await eng.shutdown()

    out, stats = asyncio.run(run())
    assert out.finished and len(out.outputs[0].token_ids) > 0
    assert stats.kv_blocks_used == 0


# ------------------------------------------------------------------ token ids and integers at admission
def _vocab(smol) -> int:
    return smol.engine.model_config.vocab_size


@pytest.mark.parametrize("make,param", [
    (lambda v: dict(stop_token_ids=[v], min_tokens=4, max_tokens=8), "stop_token_ids"),  # vocab size: one too far
    (lambda v: dict(stop_token_ids=[1_000_000], min_tokens=4, max_tokens=8), "stop_token_ids"),
    (lambda v: dict(stop_token_ids=[-100000], min_tokens=4, max_tokens=8), "stop_token_ids"),
    (lambda v: dict(logit_bias={v: 5.0}), "logit_bias"),
    (lambda v: dict(logit_bias={-100000: 5.0}), "logit_bias"),
    (lambda v: dict(allowed_token_ids=[1, v]), "allowed_token_ids"),
    (lambda v: dict(min_tokens=9, max_tokens=8), "min_tokens"),
    (lambda v: dict(seed=1 << 64), "seed"),
    (lambda v: dict(top_k=True), "top_k"),
])
def test_token_ids_outside_the_vocabulary_and_bad_integers_are_refused_before_a_step(smol, make, param):
    with pytest.raises(InvalidRequestError) as e:
        smol.generate(["Hello"], SamplingParams(**make(_vocab(smol))))
    assert e.value.param == param and param.split("_")[0] in str(e.value)
    assert not smol.engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt", [lambda v: [1, v], lambda v: [-100000], lambda v: [1, True]])
def test_prompt_token_ids_outside_the_vocabulary_are_refused(smol, prompt):
    with pytest.raises(InvalidRequestError) as e:
        smol.generate([prompt(_vocab(smol))], SamplingParams(max_tokens=2))
    assert e.value.param == "prompt" and str(_vocab(smol)) in str(e.value)


def test_async_engine_refuses_an_out_of_vocabulary_id_before_it_is_queued(smol):
    async def run():
        eng = AsyncEngine(engine=smol.engine)
        await eng.start()
        try:
            with pytest.raises(InvalidRequestError) as e:
                async for _ in eng.generate("Hi", SamplingParams(stop_token_ids=[_vocab(smol)], min_tokens=2)):
                    pass
            return e.value, eng.stats()
        finally:
            await eng.shutdown()

    err, stats = asyncio.run(run())
    assert err.param == "stop_token_ids" and stats.num_running == stats.num_waiting == 0


# ------------------------------------------------------------------ one request's failure inside a step
class Boom(RuntimeError):
    pass


def fail_after(k: int):
    """A logits processor that raises once the request has ``k`` output tokens."""
    def processor(output_ids, logits):
        if len(output_ids) >= k:
            raise Boom(f"injected after {k} tokens")
        return logits
    return processor


PROMPTS = ["Count: one, two,", "The capital of France is", "def add(a, b):", "Colours of the rainbow:"]


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def test_a_sequence_whose_sampling_raises_fails_alone_in_llm(smol):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, seed=7, max_tokens=10, ignore_eos=True)
    alone = smol.generate(PROMPTS, [greedy] * 3 + [seeded])
    bad = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logits_processors=[fail_after(3)])
    mixed = smol.generate(PROMPTS[:2] + ["Hello there"] + PROMPTS[2:], [greedy] * 2 + [bad, greedy, seeded])
    failed = mixed.pop(2)
    assert _tokens(mixed) == _tokens(alone)  # batch-mates token-exact, the seeded draw included
    assert failed.finished and failed.outputs[0].finish_reason == "error"
    assert "Boom: injected after 3 tokens" in failed.error and len(failed.outputs[0].token_ids) == 3
    assert all(o.error is None and o.outputs[0].finish_reason == "length" for o in mixed)
    assert not smol.engine.has_unfinished_requests() and smol.engine.stats().kv_blocks_used == 0


def test_a_step_that_fails_for_every_request_is_the_engines_fault(smol):
    bad = SamplingParams(temperature=0, max_tokens=4, logits_processors=[fail_after(0)])
    with pytest.raises(Boom):  # not attributable to one request: the caller sees the step's error
        smol.generate(PROMPTS[:2], bad)
    for rid in list(smol.engine.requests):
        smol.engine.abort_request(rid)


def test_a_sequence_whose_sampling_raises_fails_alone_through_the_async_engine(smol):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = smol.generate(PROMPTS, params)

    async def run():
        eng = AsyncEngine(engine=smol.engine)
        await eng.start()
        try:
            async def collect(prompt, p):
                async for o in eng.generate(prompt, p):
                    pass
                return o

            bad = SamplingParams(temperature=0, max_tokens=12, logits_processors=[fail_after(2)])
            results = await asyncio.gather(*(collect(p, params) for p in PROMPTS), collect("Hello", bad),
                                           return_exceptions=True)
            return results, eng.stats(), eng.is_running
        finally:
            await eng.shutdown()

    results, stats, running = asyncio.run(run())
    assert isinstance(results[-1], RequestFailedError) and "injected after 2 tokens" in str(results[-1])
    assert _tokens(results[:-1]) == _tokens(alone)
    assert running and stats.kv_blocks_used == 0


def test_a_lone_request_of_n_completions_whose_sampling_raises_fails_as_a_request(smol):
    bad = SamplingParams(n=2, temperature=0, max_tokens=4, logits_processors=[fail_after(1)])
    out = smol.generate(["Hi"], bad)[0]
    assert "injected after 1 tokens" in out.error and [c.finish_reason for c in out.outputs] == ["error", "error"]
    assert smol.generate(["Hi"], SamplingParams(temperature=0, max_tokens=2))[0].error is None
