"""Phi-3's longrope scaling: short factors while a sequence fits ``original_max_position_embeddings``, long
factors (and the attention factor) once it is longer, as transformers does, in prefill and in decode."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Phi3Config

from servelm.engine import LLM, SamplingParams

ORIGINAL = 32
WORDS = "river mountain code engine paper light music garden market science story window".split()


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    head_dim = 16
    rope = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
            "long_factor": [1.0 + 2.0 * i for i in range(head_dim // 2)]}
    cfg = Phi3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8 * ORIGINAL,
                     original_max_position_embeddings=ORIGINAL, rope_scaling=rope, initializer_range=0.3,
                     tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    d = tmp_path_factory.mktemp("tiny-phi3-longrope")
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.hf.save_pretrained(d)
    return d, model


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_phi3_longrope_matches_transformers_past_the_original_length(tiny_phi3):
    d, ref = tiny_phi3
    llm = LLM(model=str(d), dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20)
    assert llm.engine.model_config.rope_scaling["rope_type"] == "longrope"
    short = llm.tokenizer.encode("The capital of France is")  # its continuation crosses the original length
    long = llm.tokenizer.encode(" ".join(WORDS * 4))
    assert len(short) + 32 > ORIGINAL and len(long) > ORIGINAL
    for ids in (short, long):
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].float()
        assert (llm.engine.prompt_logits(ids) - want).abs().max().item() <= 1e-3
    # both prompts in one batch: each sequence picks its own factors
    outs = llm.generate([short, long], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for out in outs:
        assert out.outputs[0].token_ids == _hf_greedy(ref, out.prompt_token_ids, 32)
