"""gpt-oss (attention sinks, alternating sliding-window and full layers, top-k-then-softmax router with a bias,
clamped SwiGLU experts with biases, yarn RoPE) matches transformers on the same weights, also when its experts
come as MXFP4 blocks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig

from servelm.engine import LLM, SamplingParams
from servelm.engine.models.config import preset

WINDOW = 8
PROMPTS = ["The capital of France is",
           "The three laws of thermodynamics are, in the order that physicists usually give them,"]


def _config() -> GptOssConfig:
    # hidden 64 so that MXFP4's 32-value blocks tile the inputs of both expert matrices
    return GptOssConfig(vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                        num_experts_per_tok=2, sliding_window=WINDOW, max_position_embeddings=512,
                        initializer_range=0.3, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
                        pad_token_id=0)


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config()).eval()
    with torch.no_grad():  # non-zero sinks and biases (transformers initialises some of them to zero)
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "bias")):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    d = tmp_path_factory.mktemp("tiny-gpt-oss")
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.hf.save_pretrained(d)
    return d, model


def _llm(d) -> LLM:
    return LLM(model=str(d), dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _assert_matches(llm: LLM, ref, greedy: int = 32) -> None:
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].float()
        assert (llm.engine.prompt_logits(ids) - want).abs().max().item() <= 1e-3, prompt
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=greedy, ignore_eos=True))
    for out in outs:
        assert out.outputs[0].token_ids == _hf_greedy(ref, out.prompt_token_ids, greedy)


def test_tiny_gpt_oss_matches_transformers_past_its_window(tiny_gpt_oss):
    d, ref = tiny_gpt_oss
    llm = _llm(d)
    cfg = llm.engine.model_config
    assert cfg.arch == "gpt_oss" and cfg.attention_sinks and [cfg.window(i) for i in range(2)] == [WINDOW, None]
    assert len(llm.tokenizer.encode(PROMPTS[1])) >= 2 * WINDOW
    _assert_matches(llm, ref)


def _mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks and scales for a weight of ``w``'s checkpoint shape ``[E, rows, cols]`` (cols inputs):
    codes ``[E, rows, cols // 32, 16]`` and e8m0 scales near 2**-2 (values of the size of the float weights)."""
    e, rows, cols = w.shape
    blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), dtype=torch.uint8)
    scales = torch.randint(124, 127, (e, rows, cols // 32), dtype=torch.uint8)
    return blocks, scales


def test_gpt_oss_mxfp4_experts_are_dequantized_at_load(tiny_gpt_oss, tmp_path):
    """The checkpoint's experts as MXFP4 blocks (as OpenAI ships gpt-oss) give transformers' outputs on the
    weights those blocks decode to."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    d, _ = tiny_gpt_oss
    torch.manual_seed(1)
    tensors = load_file(d / "model.safetensors")
    ref = AutoModelForCausalLM.from_config(_config()).eval()
    ref.load_state_dict({k: v for k, v in tensors.items()}, strict=True)
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name)  # [E, in, out] in transformers' float layout
        blocks, scales = _mxfp4_pack(w.transpose(1, 2))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        with torch.no_grad():
            ref.get_parameter(name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["self_attn", "router"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in d.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    _assert_matches(_llm(tmp_path), ref, greedy=8)


def test_gpt_oss_dummy_preset_has_the_published_shape():
    cfg = preset("gpt-oss-20b")
    assert cfg.arch == "gpt_oss" and cfg.num_experts == 32 and cfg.num_experts_per_tok == 4
    assert [cfg.window(i) for i in range(2)] == [128, None] and cfg.attention_sinks
