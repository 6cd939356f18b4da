"""The engine matches Hugging Face transformers on the same weights: logits and greedy tokens."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from servelm.engine import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "Translate to French: Good morning, how are you?",
    "1, 2, 3, 4, 5,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis converts",
]


def _hf_greedy(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos if eos is not None else 0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def hf_smol(smol_path):
    m = AutoModelForCausalLM.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name,
                                             torch_dtype=torch.float32)
    return m.eval()


def test_prefill_logits_match_transformers_gguf(smol: LLM, hf_smol):
    for prompt in PROMPTS:
        ids = smol.tokenizer.encode(prompt)
        ours = smol.engine.prompt_logits(ids)
        with torch.no_grad():
            ref = hf_smol(torch.tensor([ids])).logits[0].float()
        assert (ours - ref).abs().max().item() <= 1e-3, prompt


def test_greedy_64_tokens_match_transformers_gguf(smol: LLM, hf_smol):
    outs = smol.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=64))
    eos = next(iter(smol.tokenizer.eos_token_ids))
    for prompt, out in zip(PROMPTS, outs):
        ref = _hf_greedy(hf_smol, out.prompt_token_ids, 64, eos)
        assert out.outputs[0].token_ids == ref, prompt


def _tiny_dir(tmp_path_factory, smol, kind: str):
    common = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    cfg = LlamaConfig(rope_theta=10000.0, **common) if kind == "llama" else Qwen2Config(rope_theta=1e6, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    d = tmp_path_factory.mktemp(f"tiny-{kind}")
    model.save_pretrained(d, safe_serialization=True)
    smol.tokenizer.hf.save_pretrained(d)
    return d, model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_random_safetensors_configs_match_transformers(tmp_path_factory, smol, kind):
    d, ref_model = _tiny_dir(tmp_path_factory, smol, kind)
    if kind == "qwen2":
        assert ref_model.model.layers[0].self_attn.q_proj.bias is not None  # qkv bias is exercised
    llm = LLM(model=str(d), dtype="float32", device="cpu")
    assert llm.engine.model_config.num_kv_heads == 2 and llm.engine.model_config.num_heads == 8
    for prompt in PROMPTS[:4]:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
        assert (llm.engine.prompt_logits(ids) - ref).abs().max().item() <= 1e-3
    outs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for out in outs:
        assert out.outputs[0].token_ids == _hf_greedy(ref_model, out.prompt_token_ids, 24, None)
