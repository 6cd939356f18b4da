"""Gemma 2, Gemma 3 (text), Phi-3 and Mistral with a sliding window match transformers on the same weights,
with prompts and continuations well past the window."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config

from servelm.engine import LLM, SamplingParams
from servelm.engine.models.config import preset

WINDOW = 8
PROMPTS = ["The capital of France is",
           "Once upon a time, in a small village, there lived a wise old man who",
           "The three laws of thermodynamics are, in the order that physicists usually give them,"]
KINDS = ["gemma2", "gemma3_text", "phi3", "mistral"]


def _config(kind: str):
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, eos_token_id=2, bos_token_id=1, pad_token_id=0, sliding_window=WINDOW)
    if kind == "gemma2":  # soft-capped scores and logits; sliding, global, sliding
        return Gemma2Config(head_dim=32, query_pre_attn_scalar=24, **common)
    if kind == "gemma3_text":  # q/k norms; the local layers' RoPE base 1e4, the global one 1e6 with linear scaling
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}
        return Gemma3TextConfig(head_dim=32, query_pre_attn_scalar=24, rope_parameters=rope,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common)
    if kind == "phi3":  # fused qkv_proj and gate_up_proj in the checkpoint
        return Phi3Config(tie_word_embeddings=False, **common)
    return MistralConfig(tie_word_embeddings=False, **common)


def _init_norms(kind: str):
    def init(model):
        for name, p in model.named_parameters():
            if "norm" in name:  # not the initial ones, so that loading them (and 1 + w) is checked
                p.uniform_(-0.5, 0.5) if kind.startswith("gemma") else p.uniform_(0.5, 1.5)
    return init


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return lambda kind: tiny_checkpoints(kind, lambda: _config(kind), _init_norms(kind))


def _llm(d, **kw) -> LLM:
    return LLM(model=str(d), dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20, **kw)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_matches_transformers_past_its_sliding_window(tiny, kind):
    d, ref = tiny(kind)
    llm = _llm(d)
    assert llm.engine.model_config.arch == kind and llm.engine.model_config.sliding_window == WINDOW
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].float()
        assert (llm.engine.prompt_logits(ids) - want).abs().max().item() <= 1e-3, prompt
    long_ids = llm.tokenizer.encode(PROMPTS[2])
    assert len(long_ids) >= 2 * WINDOW
    # the window is in force: the same weights attending to everything give other logits
    cfg = _config(kind)
    cfg.sliding_window = 512
    unwindowed = AutoModelForCausalLM.from_config(cfg).eval()
    unwindowed.load_state_dict(ref.state_dict())
    with torch.no_grad():
        full = unwindowed(torch.tensor([long_ids])).logits[0].float()
    assert (llm.engine.prompt_logits(long_ids) - full).abs().max().item() > 1e-2
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for out in outs:
        assert out.outputs[0].token_ids == _hf_greedy(ref, out.prompt_token_ids, 32)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_windowed_model_keeps_its_tokens_chunked_batched_and_from_the_prefix_cache(tiny, kind):
    """Chunks of 4 tokens (a cached prefix in every chunk after the first), a batch of all prompts and a
    second request over a cached prefix give the tokens of each prompt run alone."""
    d, _ = tiny(kind)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    long = " ".join(PROMPTS)  # past one 16-token block, so that a block is reused
    plain = _llm(d, enable_prefix_caching=False)
    alone = [plain.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS + [long]]
    chunked = _llm(d, enable_prefix_caching=False, prefill_chunk_size=4).generate(PROMPTS + [long], params)
    assert [o.outputs[0].token_ids for o in chunked] == alone
    cached = _llm(d)
    cached.generate([long], params)
    again = cached.generate([long], params)[0]
    assert again.num_cached_tokens >= 16 and again.outputs[0].token_ids == alone[-1]


def test_gemma3_dummy_preset_has_the_published_shape():
    cfg = preset("gemma-3-4b")
    assert cfg.arch == "gemma3_text" and cfg.num_layers == 34
    assert [cfg.window(i) for i in range(6)] == [1024] * 5 + [None]  # five local layers, then a global one
