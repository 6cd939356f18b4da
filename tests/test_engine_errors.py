"""Bad input gets a clear error naming the field or file; the engine keeps serving others."""
from __future__ import annotations

import asyncio

import gguf
import numpy as np
import pytest

from servelm.engine import LLM, AsyncEngine, InvalidRequestError, ModelLoadError, SamplingParams


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
