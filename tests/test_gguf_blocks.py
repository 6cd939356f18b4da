"""GGUF files run in their own blocks by default: lossless load, transformers' logits, the embedded SmolLM2
against its float path, batch invariance on the quantized path, and clear errors for files we cannot run."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from servelm.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from servelm.engine.models.config import ModelConfig, ModelLoadError
from servelm.engine.models.gguf_random import random_blocks, write_random_gguf
from servelm.engine.quant.gguf_blocks import GGUFBlockEmbedding, GGUFBlockLinear

# K-quants have 256-input blocks: hidden and intermediate sizes are multiples of 256
TINY = ModelConfig(arch="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=64, max_position_embeddings=256, name="tiny", eos_token_ids=[2],
                   tie_word_embeddings=True)
QUANTIZED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
FLOATS = ["F32", "F16", "BF16"]
IDS = [[1, 5, 9, 100, 300, 7, 8, 9, 42, 17, 250, 3], [11, 400, 23, 23, 501, 6]]


def _engine(path, **kw) -> LLM:
    return LLM(model=str(path), skip_tokenizer_init=True, max_num_seqs=4, kv_cache_memory_bytes=16 << 20, **kw)


def _arrays(qtype: str, rng) -> dict[str, np.ndarray]:
    """gguf's own quantizer for the types it has (from normal(0, 0.02) floats); None: random blocks."""
    if qtype in ("Q4_K", "Q5_K", "Q6_K", "F32", "F16", "BF16"):
        return {}  # gguf has no K-quant quantizer; float types are random values already
    from servelm.engine.models.gguf_random import gguf_tensors

    t = gguf.GGMLQuantizationType[qtype]
    return {name: gguf.quants.quantize(rng.normal(0, 0.02, shape).astype(np.float32), t)
            for name, shape in gguf_tensors(TINY) if len(shape) == 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny Llama GGUF per type. A float-typed file runs the float path unless its projections are
    quantized, so the F32/F16/BF16 files hold their first q projection in Q8_0 (a 3-part q|k|v)."""
    d = tmp_path_factory.mktemp("gguf-types")
    out = {}
    for qtype in QUANTIZED + FLOATS:
        rng = np.random.default_rng(len(out))
        types = {"blk.0.attn_q.weight": "Q8_0"} if qtype in FLOATS else {}
        out[qtype] = write_random_gguf(d / f"tiny-{qtype}.gguf", TINY, qtype, seed=len(out), types=types,
                                       arrays=_arrays(qtype, rng))
    return out


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _file_weights(path) -> dict[str, np.ndarray]:
    """Every matrix of the file as gguf.quants.dequantize gives it, q/k un-permuted (the HF layout)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, TINY.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, TINY.num_kv_heads)
        out[t.name] = w
    return out


@pytest.mark.parametrize("qtype", QUANTIZED + FLOATS)
def test_every_type_loads_losslessly_and_matches_transformers(files, qtype):
    from servelm.engine import native
    from transformers import AutoModelForCausalLM

    path = files[qtype]
    llm = _engine(path)
    m = llm.engine.model
    ref = _file_weights(path)
    assert isinstance(m.embed_tokens, GGUFBlockEmbedding) and isinstance(m.lm_head, GGUFBlockLinear)
    # the tied lm_head reads the embedding's own blocks
    assert m.lm_head.parts[0][0].data_ptr() == m.embed_tokens.blocks.data_ptr()
    emb = m.embed_tokens
    rows = torch.tensor([0, 7, 511])
    assert torch.equal(native.dequantize(emb.blocks, emb.qtype, emb.num_embeddings, emb.embedding_dim, rows=rows),
                       torch.from_numpy(ref["token_embd.weight"][rows.numpy()]))
    for i, layer in enumerate(m.layers):
        b = f"blk.{i}."
        want = {"self_attn.qkv_proj": [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
                "self_attn.o_proj": [b + "attn_output.weight"],
                "mlp.gate_up_proj": [b + "ffn_gate.weight", b + "ffn_up.weight"],
                "mlp.down_proj": [b + "ffn_down.weight"]}
        for name, sources in want.items():
            lin = layer.get_submodule(name)
            assert isinstance(lin, GGUFBlockLinear)
            used = torch.cat([native.dequantize(blk, q, n, lin.in_features) for blk, q, n in lin.parts])
            assert torch.equal(used, torch.from_numpy(np.concatenate([ref[s] for s in sources]))), (qtype, name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    for ids in IDS:
        with torch.no_grad():
            want_logits = hf(torch.tensor([ids])).logits[0].float()
        got = llm.engine.prompt_logits(ids)
        # relative to the logits' size (L2 over the vocabulary and positions). The kernels round activations
        # to 8-bit blocks as llama.cpp does (~0.5% per product on normal activations, measured), and three
        # products deep that is 1.0-1.5% on these random weights; transformers multiplies in float32.
        rel = ((got - want_logits).norm() / want_logits.norm()).item()
        assert rel <= 2e-2, (qtype, rel)


def test_float_path_is_kept_with_quantization_none(files):
    llm = _engine(files["Q4_K"], quantization="none", dtype="float32")
    assert type(llm.engine.model.layers[0].mlp.down_proj) is torch.nn.Linear
    w = llm.engine.model.layers[1].mlp.down_proj.weight
    assert torch.equal(w, torch.from_numpy(_file_weights(files["Q4_K"])["blk.1.ffn_down.weight"]))


# -- the embedded SmolLM2 (Q4_1 projections, Q8_0 tied embedding) --------------------------------------------
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three laws of thermodynamics are", "Translate to French: Good morning, how are you?", "1, 2, 3, 4, 5,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis converts",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def smol_blocks_loaded():
    """The embedded SmolLM2 as the engine loads it by default: in its GGUF blocks."""
    from servelm.engine.models.loader import load_model

    return load_model(None, torch.float32, torch.device("cpu"), gguf_blocks=True)


def _blocks_llm(loaded, **kw) -> LLM:
    return LLM.from_engine(LLMEngine(EngineConfig(device="cpu", kv_cache_memory_bytes=64 << 20, **kw), loaded=loaded))


# eight texts of at least 65 tokens: teacher forcing scores 64 next-token positions in each
TEXTS = [
    "The river flows through the old town, past the market and the cathedral, before it reaches the harbour. "
    "Farmers bring vegetables, cheese and bread to the market every Saturday morning, and the cafes around the "
    "square fill with visitors who have come from the villages in the hills to buy and sell and talk. In the evening the square is "
    "quiet again.",
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n"
    "    left = merge_sort(items[:middle])\n    right = merge_sort(items[middle:])\n    return merge(left, right)\n\n\ndef merge(left, right):\n    result = []\n    i = j = 0\n",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant cells, water is split "
    "and oxygen is released, while carbon dioxide from the air is fixed into sugars that the plant uses to grow, "
    "to store energy in its roots and seeds, and to build the cellulose of its cell walls. Almost all "
    "life on Earth depends on it.",
    "Once upon a time, in a small village at the edge of a great forest, there lived a girl who loved to read. "
    "Every evening she climbed the hill behind her house with a book under her arm and read until the sun went "
    "down and the first stars appeared above the dark line of the trees. One night she found a letter.",
    "The three laws of thermodynamics describe how energy moves. The first says that energy is conserved; the "
    "second that the entropy of an isolated system never decreases; the third that the entropy of a perfect "
    "crystal approaches zero as its temperature approaches absolute zero. Together they explain why "
    "heat flows from hot bodies to cold ones, why no engine can turn all of its heat into work, and why "
    "perpetual motion machines cannot exist.",
    "<|im_start|>user\nWhat is the boiling point of water at sea level, and why does it change on a mountain?"
    "<|im_end|>\n<|im_start|>assistant\nAt sea level water boils at 100 degrees Celsius. Higher up the air "
    "pressure is lower, so water boils at a lower temperature. On a high mountain it can boil at about "
    "seventy degrees, which is why cooking takes longer there.",
    "To make a simple tomato sauce, warm olive oil in a pan, add a chopped onion and two cloves of garlic, and "
    "cook them slowly until they are soft. Then add the tomatoes, a pinch of salt and some basil, and let the "
    "sauce simmer for twenty minutes, stirring from time to time. Serve it with pasta.",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden screw press. Books became cheaper, literacy spread across Europe, and "
    "ideas travelled faster than ever before. Within fifty years printers were at work in more than two "
    "hundred cities, and millions of books had been printed, from bibles and grammars to calendars, "
    "pamphlets and songs.",
]


def test_embedded_model_runs_quantized_by_default_and_agrees_with_float(smol, smol_blocks_loaded):
    llm = _blocks_llm(smol_blocks_loaded)
    assert isinstance(llm.engine.model.layers[0].mlp.down_proj, GGUFBlockLinear)
    assert llm.engine.model.layers[0].mlp.down_proj.qtypes == ["Q4_1"]
    agree = total = 0
    for text in TEXTS:
        ids = smol.tokenizer.encode(text)[:65]
        assert len(ids) == 65
        want = smol.engine.prompt_logits(ids)[:64].argmax(-1)  # the float32 dequantized path
        got = llm.engine.prompt_logits(ids)[:64].argmax(-1)
        agree += int((want == got).sum())
        total += 64
    assert total == 8 * 64
    assert agree / total >= 0.97, agree / total


def test_batch_invariance_and_preemption_on_the_quantized_path(smol_blocks_loaded):
    llm = _blocks_llm(smol_blocks_loaded, enable_prefix_caching=False)
    prompts = PROMPTS[:4]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    one_by_one = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    chunked = _blocks_llm(smol_blocks_loaded, enable_prefix_caching=False, prefill_chunk_size=8)
    assert together == one_by_one
    assert together == [o.outputs[0].token_ids for o in chunked.generate(prompts, GREEDY)]
    small = _blocks_llm(smol_blocks_loaded, num_kv_blocks=4)  # 64 tokens of KV for ~4 x 25 tokens of demand
    assert [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY)] == together
    assert small.engine.stats().num_preemptions > 0


# -- bad files ----------------------------------------------------------------------------------------------
def test_unsupported_type_names_file_tensor_and_type(tmp_path):
    path = write_random_gguf(tmp_path / "q2k.gguf", TINY, "Q4_K", types={"blk.1.ffn_down.weight": "Q2_K"},
                             arrays={"blk.1.ffn_down.weight": np.random.default_rng(0).integers(
                                 0, 256, (256, 512 // 256 * 84), dtype=np.uint8)})
    with pytest.raises(ModelLoadError) as e:
        _engine(path)
    assert "q2k.gguf" in str(e.value) and "blk.1.ffn_down.weight" in str(e.value) and "Q2_K" in str(e.value)
    assert "--quantization none" in str(e.value)


def test_truncated_file_names_the_tensor(tmp_path, files):
    data = files["Q4_0"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:len(data) - 5000])
    with pytest.raises(ModelLoadError) as e:
        _engine(path)
    msg = str(e.value)
    assert "cut.gguf" in msg and "truncated" in msg and "blk.1.ffn_down.weight" in msg and "Q4_0" in msg


def test_tensor_shape_that_disagrees_with_the_metadata(tmp_path):
    path = write_random_gguf(tmp_path / "lie.gguf", TINY, "Q8_0")
    r = gguf.GGUFReader(str(path), "r+")  # the metadata now says 768, the tensors stay 512 wide
    r.fields["llama.feed_forward_length"].parts[-1][0] = 768
    del r
    with pytest.raises(ModelLoadError) as e:
        _engine(path)
    msg = str(e.value)
    assert "lie.gguf" in msg and "blk.0.ffn_gate.weight" in msg and "Q8_0" in msg and "metadata" in msg


def test_random_blocks_have_sane_scales():
    w = gguf.quants.dequantize(random_blocks("Q4_K", 8, 512, np.random.default_rng(0)), gguf.GGMLQuantizationType.Q4_K)
    assert np.isfinite(w).all() and 0.002 < np.abs(w).mean() < 0.2


def test_quantize_report_lists_the_gguf_blocks_as_loaded(files):
    from servelm.engine.quant.apply import model_weight_bytes
    from servelm.engine.quant.report import format_ladder, ladder

    r = ladder(str(files["Q4_K"]))
    row = r["formats"]["gguf"]
    assert row["source"] == "Q4_K" and row["projection_bits_per_weight"] == 4.5  # 144 bytes per 256 weights
    loaded = _engine(files["Q4_K"]).engine.model
    rope = sum(b.numel() * b.element_size() for b in loaded.rope.buffers())  # computed, not stored in the file
    assert model_weight_bytes(loaded) - rope == row["computed_bytes"]
    assert "GGUF Q4_K" in format_ladder(r)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_map_exactly_onto_the_int4_g32_grid(files, qtype):
    """What CUDA loads Q4_0/Q4_1 into: int4 codes with (scale, zero) per 32 inputs, the same weights."""
    from servelm.engine.models import gguf_loader
    from servelm.engine.models.loader import _q4_codes
    from servelm.engine.quant.int4 import Int4Linear

    path = files[qtype]
    _, w, _ = gguf_loader.read_gguf_blocks(path)
    t = w["model.layers.1.mlp.down_proj.weight"]
    q, scale, zero = _q4_codes(t)
    deq = ((q.reshape(t.n, -1, 32) - 8) * scale[..., None] + zero[..., None]).reshape(t.n, t.k)
    assert torch.equal(deq, torch.from_numpy(_file_weights(path)["blk.1.ffn_down.weight"]))
    lin = torch.nn.Linear(t.k, t.n, bias=False)
    int4 = Int4Linear(lin, 32, codes=(q, scale, zero))
    # Int4Linear holds the blocks' own (scale, zero) per group, rounded to bf16 ([K/32, N, 2])
    assert torch.equal(int4.scales_zeros, torch.stack([scale, zero], -1).transpose(0, 1).to(torch.bfloat16))
