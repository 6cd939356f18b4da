"""The engine matches Hugging Face transformers on the same weights: logits and greedy tokens."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

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
    if kind == "llama":
        cfg = LlamaConfig(rope_theta=10000.0, **common)
    elif kind == "qwen2":
        cfg = Qwen2Config(rope_theta=1e6, **common)
    else:  # Qwen3: q/k norms, and a head_dim that is not hidden_size / heads
        cfg = Qwen3Config(rope_theta=1e6, head_dim=32, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)  # not the initial ones, so that loading them is checked
    d = tmp_path_factory.mktemp(f"tiny-{kind}")
    model.save_pretrained(d, safe_serialization=True)
    smol.tokenizer.hf.save_pretrained(d)
    return d, model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tiny_random_safetensors_configs_match_transformers(tmp_path_factory, smol, kind):
    d, ref_model = _tiny_dir(tmp_path_factory, smol, kind)
    if kind == "qwen2":
        assert ref_model.model.layers[0].self_attn.q_proj.bias is not None  # qkv bias is exercised
    if kind == "qwen3":
        assert ref_model.model.layers[0].self_attn.q_norm is not None
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


# HF name (after "model.layers.N.") -> GGUF name (after "blk.N."), as llama.cpp's converter writes them
_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gguf(path, arch: str, model, rope_freqs=None) -> None:
    """Writes ``model`` (a transformers decoder) as llama.cpp's converter would: F32 tensors under GGUF
    names, q/k rows permuted for llama, and ``rope_freqs`` when given."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_context_length(c.max_position_embeddings)
    w.add_vocab_size(c.vocab_size)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}

    def permute(t, heads):  # llama.cpp's LlamaModel.permute
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    for name, p in model.state_dict().items():
        t = p.float()
        if name not in top:
            _, _, idx, stem = name.removesuffix(".weight").split(".", 3)
            top[name] = f"blk.{idx}.{_GGUF_LAYER[stem]}.weight"
            if arch == "llama" and stem == "self_attn.q_proj":
                t = permute(t, c.num_attention_heads)
            elif arch == "llama" and stem == "self_attn.k_proj":
                t = permute(t, c.num_key_value_heads)
        w.add_tensor(top[name], t.numpy())
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits_match(llm, ref_model, prompts) -> None:
    for prompt in prompts:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
        assert (llm.engine.prompt_logits(ids) - ref).abs().max().item() <= 1e-3, prompt


def test_qwen3_gguf_matches_transformers(tmp_path_factory, smol):
    """A Qwen3 GGUF (per-head q/k norms, head_dim 32 != hidden / heads) loads with its norms and gives
    transformers' logits; the tokenizer comes from the HF directory (``tokenizer=``)."""
    d, ref_model = _tiny_dir(tmp_path_factory, smol, "qwen3")
    _write_gguf(d / "tiny-qwen3.gguf", "qwen3", ref_model)
    llm = LLM(model=str(d / "tiny-qwen3.gguf"), tokenizer=str(d), dtype="float32", device="cpu")
    assert llm.engine.model_config.qk_norm and llm.engine.model_config.head_dim == 32
    _logits_match(llm, ref_model, PROMPTS[:4])


def test_llama3_rope_scaling_from_a_gguf_rope_freqs_tensor(tmp_path_factory, smol):
    """Llama 3.1+ GGUFs carry llama3 rope scaling as a ``rope_freqs`` tensor of per-frequency divisors
    (llama.cpp's converter writes no scaling parameters): loaded, they give the logits of the HF model
    with its ``rope_scaling``, beyond the original context where the scaling matters most."""
    import math

    import numpy as np

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, rope_theta=10000.0, rope_scaling=scaling, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    ref_model = AutoModelForCausalLM.from_config(cfg).eval()
    d = tmp_path_factory.mktemp("tiny-llama3-rope")
    smol.tokenizer.hf.save_pretrained(d)
    # llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors), in float64
    base = 10000.0 ** (-np.arange(0, 16, 2, dtype=np.float64) / 16)
    low_wavelen, high_wavelen = 32 / 1.0, 32 / 4.0
    factors = []
    for freq in base:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(8.0)
        else:
            smooth = (32 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert len(set(factors)) > 2  # unscaled, scaled and smoothed frequencies are all exercised
    _write_gguf(d / "tiny-llama3.gguf", "llama", ref_model, rope_freqs=np.array(factors))
    llm = LLM(model=str(d / "tiny-llama3.gguf"), tokenizer=str(d), dtype="float32", device="cpu")
    assert llm.engine.model_config.rope_scaling["rope_type"] == "freq_factors"
    _logits_match(llm, ref_model, [PROMPTS[0], " ".join(PROMPTS)])  # the second is ~100 tokens, past 32


def test_a_sentencepiece_only_checkpoint_loads(tmp_path, smol):
    """Older Llama/Mistral repositories ship a SentencePiece ``tokenizer.model`` and no ``tokenizer.json``:
    the directory loads (transformers converts the tokenizer) and generates as transformers does."""
    import json
    import os

    import sentencepiece as spm
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS * 20 + [f"line {i}: the quick brown fox {i * 7}" for i in range(200)]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    d = tmp_path / "sp-llama"
    cfg = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.3, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    os.replace(tmp_path / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                         "eos_token": "</s>", "unk_token": "<unk>"}))
    assert not (d / "tokenizer.json").exists()
    llm = LLM(model=str(d), dtype="float32", device="cpu")
    ref_tok = AutoTokenizer.from_pretrained(str(d))
    assert llm.tokenizer.encode(PROMPTS[0]) == ref_tok.encode(PROMPTS[0])
    out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for o in out:
        ids = o.outputs[0].token_ids
        assert ids == _hf_greedy(model, o.prompt_token_ids, 16, None)
        assert llm.tokenizer.decode(o.prompt_token_ids + ids) == ref_tok.decode(o.prompt_token_ids + ids,
                                                                                  skip_special_tokens=True)
