"""Structured outputs in the engine: every completion follows its JSON schema / regex / choice / grammar, the
mask touches only constrained rows, and preemption or aborts neither break the grammar nor leak state."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from servelm.engine import InvalidRequestError, SamplingParams, StructuredOutputParams
from servelm.engine.sampling import Sampler
from servelm.engine.sequence import Sequence
from servelm.engine.structured_output import GrammarCompiler

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


def _chat(llm, question: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def _run(llm, question: str, spec: StructuredOutputParams, **kw):
    params = SamplingParams(temperature=kw.pop("temperature", 0), max_tokens=kw.pop("max_tokens", 30),
                            structured_output=spec, **kw)
    return llm.generate(_chat(llm, question), params)[0].outputs


def test_json_schema_answers_validate_for_each_of_n_completions(smol):
    outs = _run(smol, "Name a person and their age.", StructuredOutputParams(json=PERSON), n=2, temperature=0.8,
                seed=1, max_tokens=24)
    assert len(outs) == 2 and outs[0].text != outs[1].text
    for o in outs:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), PERSON)


def test_regex_choice_and_grammar_answers_match(smol):
    (o,) = _run(smol, "Give a phone number.", StructuredOutputParams(regex=r"\d{3}-\d{4}"))
    assert re.fullmatch(r"\d{3}-\d{4}", o.text) and o.finish_reason == "stop"
    choices = ["yes", "no", 'maybe "so"\n', "héllo"]  # quotes, newlines and non-ASCII survive the escaping
    (o,) = _run(smol, "Is Paris in France?", StructuredOutputParams(choice=choices))
    assert o.text in choices and o.finish_reason == "stop"
    forced = [SamplingParams(temperature=0, max_tokens=16, structured_output=StructuredOutputParams(choice=[c]))
              for c in choices]
    outs = smol.generate([_chat(smol, "Say something.")] * len(choices), forced)
    assert [o.outputs[0].text for o in outs] == choices
    (o,) = _run(smol, "Count.", StructuredOutputParams(grammar='root ::= ("a" | "b")+ "."'))
    assert re.fullmatch(r"[ab]+\.", o.text)


def test_unconstrained_batch_mates_keep_their_greedy_output(smol):
    plain = [_chat(smol, q) for q in ("What is the capital of France?", "Write a haiku about rain.")]
    params = SamplingParams(temperature=0, max_tokens=8)
    alone = [o.outputs[0].token_ids for o in smol.generate(plain, params)]
    constrained = SamplingParams(temperature=0, max_tokens=8, structured_output=StructuredOutputParams(json=PERSON))
    mixed = smol.generate([plain[0], _chat(smol, "A person?"), plain[1]], [params, constrained, params])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert mixed[1].outputs[0].text.startswith('{"name": ')


def test_preemption_by_recompute_keeps_the_grammar_on_track(make_llm):
    spec = StructuredOutputParams(regex=r"(\d{2}, )+")
    prompts = [f"Count from {i}0:" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=28, structured_output=spec)
    reference = [o.outputs[0].text for o in make_llm().generate(prompts, params)]
    small = make_llm(num_kv_blocks=7)  # 112 tokens of KV for ~4 x 35 tokens of demand
    outs = [o.outputs[0].text for o in small.generate(prompts, params)]
    stats = small.engine.stats()
    assert stats.num_preemptions > 0
    assert outs == reference
    assert all(re.fullmatch(r"(\d{2}, )*\d{0,2},? ?", t) for t in outs)
    assert stats.kv_blocks_used == 0


def test_aborted_constrained_request_leaves_nothing_behind(make_llm):
    llm = make_llm()
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10, structured_output=StructuredOutputParams(json=PERSON))
    eng.add_request("a", _chat(llm, "A person?"), params)
    eng.add_request("b", _chat(llm, "Another person?"), params)
    for _ in range(3):
        eng.step()
    out = eng.abort_request("a")
    assert out.outputs[0].finish_reason == "abort"
    last = None
    while eng.has_unfinished_requests():
        last = eng.step() or last
    assert last[0].request_id == "b" and last[0].outputs[0].text.startswith('{"name": ')
    assert not eng.scheduler.running and not eng.scheduler.waiting
    assert eng.stats().kv_blocks_used == 0


def test_sampler_draws_only_tokens_the_grammar_allows(smol, tokenizer):
    compiler = GrammarCompiler(tokenizer, smol.engine.model_config.vocab_size)
    grammar = compiler.compile(StructuredOutputParams(choice=["yes", "no"]))
    allowed = {tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")}
    vocab = smol.engine.model_config.vocab_size
    sampler = Sampler(tokenizer.eos_token_ids)
    torch.manual_seed(0)
    logits = torch.randn(3, vocab) * 5
    seqs = [Sequence(str(i), 0, [1, 2], SamplingParams(temperature=1.0, seed=i), 0.0, 8) for i in range(3)]
    seqs[1].grammar = compiler.matcher(grammar)
    free = [Sequence(str(i), 0, [1, 2], SamplingParams(temperature=1.0, seed=i), 0.0, 8) for i in (0, 2)]
    drawn = sampler(logits.clone(), seqs).token_ids
    assert drawn[1] in allowed
    assert [drawn[0], drawn[2]] == sampler(logits[[0, 2]].clone(), free).token_ids  # the other rows: untouched
    seqs[1].grammar.accept_token(drawn[1])
    assert sampler(logits.clone(), seqs).token_ids[1] in tokenizer.eos_token_ids  # complete: only EOS is left


@pytest.mark.parametrize("spec, param", [
    (dict(json={"type": "nope"}), "structured_output.json"),
    (dict(json="{not json"), "structured_output.json"),
    (dict(regex="(ab"), "structured_output.regex"),
    (dict(grammar="root ::= "), "structured_output.grammar"),
    (dict(choice=[]), "structured_output.choice"),
    (dict(regex="a", choice=["a"]), "structured_output"),
])
def test_bad_specs_are_refused_naming_the_field(smol, spec, param):
    with pytest.raises(InvalidRequestError) as e:
        smol.generate("Hi", SamplingParams(structured_output=StructuredOutputParams(**spec)))
    assert e.value.param == param
    assert "/project/cpp" not in e.value.message
    assert not smol.engine.has_unfinished_requests()


def test_a_hf_directory_tokenizer_gives_the_same_grammar(tmp_path, smol, tokenizer):
    from servelm.engine.tokenizer import Tokenizer

    tokenizer.hf.save_pretrained(tmp_path)
    hf_dir = Tokenizer.from_source(tmp_path, sorted(tokenizer.eos_token_ids))
    vocab = smol.engine.model_config.vocab_size
    text = '{"name": "Ann", "age": 7}'
    for tok in (tokenizer, hf_dir):
        compiler = GrammarCompiler(tok, vocab)
        m = compiler.matcher(compiler.compile(StructuredOutputParams(json=PERSON)))
        assert all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False))
        assert m.accept_token(min(tok.eos_token_ids)) and m.is_terminated()
