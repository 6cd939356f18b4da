"""Scripts written for vLLM's offline API run on servelm unchanged: chat, get_tokenizer, prompt dicts,
dict-shaped logprobs, vLLM's SamplingParams and LLM keywords, and Hub repo ids (from the HF cache)."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest
import torch

from servelm import LLM, SamplingParams
from servelm.engine import AsyncEngine, EngineConfig, InvalidRequestError, LLMEngine
from servelm.engine.models.config import ModelLoadError

@dataclass
class GuidedDecodingParams:
    """The fields of vLLM's ``vllm.sampling_params.GuidedDecodingParams`` (a dataclass), for scripts that pass one."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


GREEDY = SamplingParams(temperature=0, max_tokens=8)
HI = [{"role": "user", "content": "Hi"}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_returns_one_output_per_conversation_like_vllm(smol):
    one = smol.chat(HI, GREEDY)
    assert isinstance(one, list) and len(one) == 1 and one[0].outputs[0].text
    both = smol.chat([HI, FRANCE], GREEDY, use_tqdm=False)
    assert [o.outputs[0].text for o in both] == [one[0].outputs[0].text, smol.chat(FRANCE, GREEDY)[0].outputs[0].text]
    assert "Paris" in both[1].outputs[0].text
    # OpenAI content parts: the text parts are joined
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    assert smol.chat(parts, GREEDY)[0].outputs[0].text == both[1].outputs[0].text
    with pytest.raises(InvalidRequestError, match="'image_url' content part"):
        smol.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], GREEDY)


def test_chat_template_options(smol):
    # the canonical vLLM recipe: render with the HF tokenizer, then generate; same as chat()
    prompt = smol.get_tokenizer().apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert smol.generate(prompt, GREEDY)[0].outputs[0].text == smol.chat(FRANCE, GREEDY)[0].outputs[0].text
    ids = smol.tokenizer.apply_chat_template(FRANCE, tokenize=True)
    assert ids == smol.chat(FRANCE, GREEDY)[0].prompt_token_ids
    # continue the assistant's unfinished answer instead of opening a new turn
    cont = smol.chat(FRANCE + [{"role": "assistant", "content": "The capital of France is"}], GREEDY,
                     add_generation_prompt=False, continue_final_message=True)[0]
    assert cont.prompt.endswith("The capital of France is") and "Paris" in cont.outputs[0].text
    custom = smol.chat(HI, GREEDY, chat_template="{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:",
                       chat_template_kwargs={"unused": 1})[0]
    assert custom.prompt == "Q: Hi\nA:"


def test_prompt_dicts_single_and_batched(smol):
    ids = smol.tokenizer.encode("The capital of France is")
    want = smol.generate("The capital of France is", GREEDY)[0].outputs[0].text
    assert smol.generate({"prompt_token_ids": ids}, GREEDY)[0].outputs[0].text == want
    outs = smol.generate([{"prompt": "The capital of France is"}, {"prompt_token_ids": ids}], GREEDY)
    assert [o.outputs[0].text for o in outs] == [want, want] and outs[0].prompt == "The capital of France is"
    with pytest.raises(InvalidRequestError) as e:
        smol.generate([{"prompt": "ok"}, {"prompt_ids": ids}], GREEDY)
    assert e.value.param == "prompt.prompt_ids" and "prompt_token_ids" in e.value.message
    assert not smol.engine.has_unfinished_requests()  # nothing of the batch was left queued


def test_async_engine_vllm_style(smol):
    async def run():
        eng = AsyncEngine(engine=smol.engine)
        await eng.start()
        try:
            tok = await eng.get_tokenizer()
            ids = tok.encode("The capital of France is")
            async for out in eng.generate(prompt={"prompt_token_ids": ids}, sampling_params=GREEDY,
                                          request_id="vllm-1"):
                pass
            return out
        finally:
            await eng.shutdown()

    out = asyncio.run(run())
    assert out.finished and out.outputs[0].text == smol.generate("The capital of France is", GREEDY)[0].outputs[0].text


def test_logprobs_are_dicts_of_token_id_to_logprob(smol):
    o = smol.generate("The capital of France is",
                      SamplingParams(logprobs=5, prompt_logprobs=1, max_tokens=3, temperature=0))[0]
    c = o.outputs[0]
    for tid, pos in zip(c.token_ids, c.logprobs):
        assert pos[tid].rank == 1 and pos[tid].decoded_token == smol.tokenizer.decode([tid])  # greedy: the top one
        assert len(pos) == 5 and list(pos.keys())[0] == tid
        assert sorted(lp.logprob for lp in pos.values())[::-1] == [lp.logprob for _, lp in pos.items()]
    assert abs(c.cumulative_logprob - sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs))) < 1e-5
    assert o.prompt_logprobs[0] is None
    for tid, pos in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:]):
        assert tid in pos and pos[tid].rank >= 1 and len(pos) in (1, 2)
        assert pos[tid].rank == 1 or pos[tid].logprob < max(lp.logprob for lp in pos.values())
    assert smol.generate("Hi", GREEDY)[0].outputs[0].cumulative_logprob is None  # not requested, as vLLM


def test_vllm_sampling_params(smol):
    prompt = "The capital of France is"
    allowed = [28, 29, 30]
    base, no_paris, only, raw, cut = smol.generate([prompt] * 5, [  # one batch: each row its own settings
        SamplingParams(temperature=0, max_tokens=8),
        SamplingParams(temperature=0, max_tokens=8, bad_words=["Paris"]),
        SamplingParams(temperature=0.8, seed=1, max_tokens=6, allowed_token_ids=allowed),
        SamplingParams(temperature=0, max_tokens=8, detokenize=False),
        SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=2)])
    assert "Paris" in base.outputs[0].text and "Paris" not in no_paris.outputs[0].text
    assert only.outputs[0].token_ids and set(only.outputs[0].token_ids) <= set(allowed)
    assert raw.outputs[0].text == "" and raw.outputs[0].token_ids == base.outputs[0].token_ids
    assert cut.prompt_token_ids == smol.tokenizer.encode(prompt)[-2:]
    # a chat reply ends with <|im_end|>: dropped from the text by default, kept with skip_special_tokens=False
    chat = dict(temperature=0, max_tokens=14, ignore_eos=True)
    skipped, kept = smol.chat([HI, HI], [SamplingParams(**chat), SamplingParams(**chat, skip_special_tokens=False)])
    assert "<|im_end|>" not in skipped.outputs[0].text and "<|im_end|>" in kept.outputs[0].text
    # vLLM's names for structured output: its objects, or dicts with json/regex/choice/grammar
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    outs = smol.chat([FRANCE] * 3, [
        SamplingParams(temperature=0, max_tokens=20, structured_outputs={"json": schema}),
        SamplingParams(temperature=0, max_tokens=20, guided_decoding=GuidedDecodingParams(json=schema)),
        SamplingParams(temperature=0, guided_decoding={"choice": ["yes", "no"], "backend": "xgrammar"})])
    assert all("city" in json.loads(o.outputs[0].text) for o in outs[:2])
    assert outs[2].outputs[0].text in ("yes", "no")
    assert SamplingParams(n=2, best_of=2, output_kind=0, spaces_between_special_tokens=False).n == 2


@pytest.mark.parametrize("kwargs, param", [
    (dict(best_of=3), "best_of"), (dict(logprobs=-1), "logprobs"), (dict(detokenize=False, stop=["."]), "stop"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(structured_outputs={"structural_tag": "x"}), "structured_outputs.structural_tag"),
])
def test_vllm_sampling_params_refused_clearly(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    with pytest.raises(TypeError):
        SamplingParams(not_a_vllm_option=1)


@pytest.mark.parametrize("kwargs", [dict(kv_cache_dtype="fp8"), dict(tokenizer_mode="slow"), dict(max_logprobs=50)])
def test_llm_refuses_vllm_options_it_cannot_honour(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LLM(**kwargs)
    with pytest.raises(TypeError, match="unknown LLM options"):
        LLM(not_an_option=1)


def _hub_cache(root, smol, repo: str):
    """A Hugging Face cache (``models--org--name/{refs,snapshots}``) holding a tiny random Llama and
    SmolLM2's tokenizer, as ``snapshot_download`` leaves it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    model.save_pretrained(snap, safe_serialization=True)
    smol.tokenizer.hf.save_pretrained(snap)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return model


def test_hub_repo_id_loads_from_the_cache_offline(tmp_path, smol):
    ref = _hub_cache(tmp_path, smol, "tiny-org/tiny-llama")
    llm = LLM(model="tiny-org/tiny-llama", download_dir=str(tmp_path), tokenizer="tiny-org/tiny-llama",
              trust_remote_code=True, swap_space=4, disable_log_stats=True, enable_chunked_prefill=True,
              tokenizer_mode="auto", kv_cache_dtype="auto", max_logprobs=20, enforce_eager=True,
              dtype="float32", device="cpu")
    ids = llm.get_tokenizer().encode("Hello world")
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1].argmax().item()
    assert llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1,
                                                                  ignore_eos=True))[0].outputs[0].token_ids == [want]
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache.*offline"):
        LLM(model="tiny-org/not-there", download_dir=str(tmp_path))


def test_skip_tokenizer_init_serves_token_ids_and_refuses_text_clearly(smol):
    """vLLM's ``skip_tokenizer_init``: token-id prompts give the same tokens as with the tokenizer, and
    empty text; a text prompt or a text feature is refused by name rather than failing later."""
    ids = smol.get_tokenizer().encode("The capital of France is")
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)
    bare = LLM.from_engine(LLMEngine(EngineConfig(skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 26),
                                     loaded=smol.engine.loaded))
    assert bare.get_tokenizer() is None
    out = bare.generate([{"prompt_token_ids": ids}], params)[0].outputs[0]
    ref = smol.generate([{"prompt_token_ids": ids}], params)[0].outputs[0]
    assert out.token_ids == ref.token_ids and ref.text and out.text == ""
    assert out.logprobs[0][out.token_ids[0]].logprob == pytest.approx(ref.logprobs[0][ref.token_ids[0]].logprob)
    with pytest.raises(InvalidRequestError, match="token ids") as e:
        bare.generate(["The capital of France is"], params)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as e:
        bare.generate([ids], SamplingParams(max_tokens=4, stop=["."]))
    assert e.value.param == "stop"
