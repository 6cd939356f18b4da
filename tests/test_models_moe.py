"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) match transformers on the same weights, and keep
their outputs under batching, chunked prefill and preemption."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from servelm.engine import LLM, SamplingParams
from servelm.engine.models.config import ModelConfig, ModelLoadError, preset

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are"]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _config(kind: str):
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    if kind == "mixtral":  # 8 experts, top-2, weights renormalised
        return MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **common)
    if kind == "qwen2_moe":  # a shared expert behind a sigmoid gate, no renormalisation, qkv bias, a dense layer
        return Qwen2MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                              shared_expert_intermediate_size=96, mlp_only_layers=[1], **common)
    # Qwen3-MoE: top-3 of 8 with norm_topk_prob, per-head q/k norms, head_dim != hidden / heads
    return Qwen3MoeConfig(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                          head_dim=32, **common)


@pytest.fixture(scope="module")
def tiny_moe(tiny_checkpoints):
    """kind -> (HF directory, the transformers model), built once per kind."""
    return lambda kind: tiny_checkpoints(kind, lambda: _config(kind))


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _llm(d, **kw) -> LLM:
    return LLM(model=str(d), dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20, **kw)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_tiny_moe_matches_transformers_logits_and_greedy_tokens(tiny_moe, kind):
    d, ref = tiny_moe(kind)
    llm = _llm(d)
    cfg = llm.engine.model_config
    assert cfg.arch == kind and cfg.num_experts == 8
    if kind == "qwen2_moe":
        assert cfg.moe_layers == [0, 2] and cfg.shared_expert_intermediate_size == 96
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].float()
        assert (llm.engine.prompt_logits(ids) - want).abs().max().item() <= 1e-3, prompt
    for out in llm.generate(PROMPTS, GREEDY):
        assert out.outputs[0].token_ids == _hf_greedy(ref, out.prompt_token_ids, 32)


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "river mountain code engine paper light music garden market science story window".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 100))) for _ in range(n)]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_moe_batch_invariance_together_one_by_one_and_chunked(tiny_moe):
    """Routing is per token: a request's tokens are the same alone, in a batch of 16 and in 16-token chunks."""
    d, _ = tiny_moe("qwen3_moe")
    prompts = _prompts(16, seed=0)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = _llm(d, enable_prefix_caching=False)
    together = _tokens(llm.generate(prompts, params))
    assert together == [_tokens(llm.generate([p], params))[0] for p in prompts]
    assert together == _tokens(_llm(d, enable_prefix_caching=False, prefill_chunk_size=16).generate(prompts, params))


def test_moe_preemption_under_tiny_kv_budget_gives_same_outputs(tiny_moe):
    d, _ = tiny_moe("mixtral")
    prompts = _prompts(10, seed=1)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = _tokens(_llm(d).generate(prompts, params))
    small = LLM(model=str(d), dtype="float32", device="cpu", num_kv_blocks=16)
    outs = _tokens(small.generate(prompts, params))
    stats = small.engine.stats()
    assert stats.num_preemptions > 0
    assert outs == reference
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize("arch,says", [("deepseek_v3", "MLA"), ("llava", "vision tower")])
def test_an_unsupported_architecture_is_named_with_what_runs(arch, says):
    with pytest.raises(ModelLoadError) as e:
        ModelConfig.from_hf_dict({"model_type": arch, "num_attention_heads": 8})
    msg = str(e.value)
    assert repr(arch) in msg and says in msg and "mixtral" in msg and "qwen3_moe" in msg


@pytest.mark.parametrize("name,active", [("mixtral-8x7b", 2), ("qwen3-30b-a3b", 8)])
def test_moe_dummy_presets_have_the_published_shapes(name, active):
    cfg = preset(name)
    assert cfg.num_experts_per_tok == active and cfg.is_moe_layer(0)
