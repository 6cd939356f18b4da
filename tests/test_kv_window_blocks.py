"""A model whose every layer attends through a sliding window (Mistral) holds a bounded number of KV blocks
however long it generates, and still produces transformers' tokens; a model with a global layer keeps all."""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, MistralConfig

from servelm.engine import LLM, SamplingParams

WINDOW = 8
STEPS = 96


def _common():
    return dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
                eos_token_id=2, bos_token_id=1, pad_token_id=0, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    def config(kind):
        return (MistralConfig(tie_word_embeddings=False, **_common()) if kind == "mistral"
                else Gemma2Config(head_dim=16, **_common()))
    return lambda kind: tiny_checkpoints(f"window-{kind}", lambda: config(kind))


def _run(d, prompts: list[str]) -> tuple[LLM, list[list[int]], int]:
    """(engine, greedy tokens per prompt, most blocks in use at once)."""
    llm = LLM(model=str(d), dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    done, most = {}, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        most = max(most, eng.kv.stats().used)
    assert eng.kv.stats().used == 0
    return llm, [done[str(i)].outputs[0].token_ids for i in range(len(prompts))], most


def test_all_windowed_model_holds_bounded_blocks_and_matches_transformers(tiny):
    d, ref = tiny("mistral")
    prompts = ["The capital of France is", "river mountain code engine paper light music garden market " * 4]
    llm, tokens, most = _run(d, prompts)
    bs = llm.engine.kv.block_size
    # each sequence keeps the blocks its window spans, plus the one being filled (not its whole context)
    per_seq = -(-WINDOW // bs) + 1
    assert most <= len(prompts) * per_seq < len(prompts) * -(-STEPS // bs)
    for p, got in zip(prompts, tokens):
        ids = llm.tokenizer.encode(p)
        want = ref.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(ids):].tolist()
        assert got == want
    # the same prompt again reuses the first prompt's cached (released) prefix blocks and gives the same tokens
    again = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))[0]
    assert again.num_cached_tokens >= bs and again.outputs[0].token_ids == tokens[1]


def test_model_with_a_global_layer_keeps_every_block(tiny):
    d, _ = tiny("gemma2")  # sliding, then global
    llm, _, most = _run(d, ["The capital of France is"])
    n = len(llm.tokenizer.encode("The capital of France is")) + STEPS
    assert llm.engine.kv.window is None and most == -(-n // llm.engine.kv.block_size)
