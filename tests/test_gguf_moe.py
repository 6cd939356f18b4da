"""A Qwen3-MoE checkpoint written as a GGUF (llama.cpp's qwen3moe layout: stacked ``ffn_*_exps`` experts and an
``ffn_gate_inp`` router) loads, runs on the PyTorch path (the native CPU forward is Llama-only) and agrees
with the same weights loaded from safetensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from servelm.engine import LLM, SamplingParams
from servelm.engine.models.config import ModelLoadError

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def tiny_qwen3_moe(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                         initializer_range=0.3, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    d = tmp_path_factory.mktemp("tiny-qwen3-moe-gguf")
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d, safe_serialization=True)
    tokenizer.hf.save_pretrained(d)
    return d, cfg


def _write_gguf(path, cfg, hf: dict[str, torch.Tensor], arch: str = "qwen3moe") -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_vocab_size(cfg.vocab_size)

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.float().numpy().astype(np.float32))

    put("token_embd.weight", hf["model.embed_tokens.weight"])
    put("output_norm.weight", hf["model.norm.weight"])
    put("output.weight", hf["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for g, h in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                     ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("attn_q_norm", "self_attn.q_norm"),
                     ("attn_k_norm", "self_attn.k_norm"), ("ffn_gate_inp", "mlp.gate")):
            put(f"blk.{i}.{g}.weight", hf[p + h + ".weight"])
        for g, h in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
            # the checkpoint's per-expert matrices, stacked [E, rows, inputs] as llama.cpp's converter does
            put(f"blk.{i}.{g}.weight", torch.stack([hf[p + f"mlp.experts.{e}.{h}.weight"]
                                                    for e in range(cfg.num_experts)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3_moe_gguf_agrees_with_its_safetensors(tiny_qwen3_moe, tmp_path):
    d, cfg = tiny_qwen3_moe
    path = tmp_path / "tiny-qwen3moe-f32.gguf"
    _write_gguf(path, cfg, load_file(d / "model.safetensors"))
    st = LLM(model=str(d), dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20)
    gg = LLM(model=str(path), tokenizer=str(d), dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20)
    mc = gg.engine.model_config
    assert mc.arch == "qwen3_moe" and mc.num_experts == 8 and mc.num_experts_per_tok == 3 and mc.norm_topk_prob
    for prompt in PROMPTS:
        ids = st.tokenizer.encode(prompt)
        assert (gg.engine.prompt_logits(ids) - st.engine.prompt_logits(ids)).abs().max().item() <= 1e-4
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert ([o.outputs[0].token_ids for o in gg.generate(PROMPTS, params)]
            == [o.outputs[0].token_ids for o in st.generate(PROMPTS, params)])


def test_a_mixture_of_experts_gguf_of_another_architecture_is_refused_by_name(tiny_qwen3_moe, tmp_path):
    d, cfg = tiny_qwen3_moe
    path = tmp_path / "tiny-moe-as-qwen2moe.gguf"
    _write_gguf(path, cfg, load_file(d / "model.safetensors"), arch="qwen2")
    with pytest.raises(ModelLoadError, match="qwen3moe"):
        LLM(model=str(path), tokenizer=str(d), dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20)
