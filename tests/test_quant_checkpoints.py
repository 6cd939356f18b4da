"""Pre-quantized checkpoints (GPTQ, AWQ, compressed-tensors, FP8): a tiny random Llama written in each
format loads, its layers hold exactly the format's reference dequantization, and greedy output equals
transformers running those dequantized weights.

GPTQ and AWQ files are written here from their documented layouts (gptqmodel and autoawq need CUDA to
quantize); compressed-tensors files are written and decoded (as the reference) by the library itself."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from servelm.engine import LLM, SamplingParams
from servelm.engine.models.config import ModelLoadError
from servelm.engine.quant import Int4Linear, Int8Linear
from servelm.engine.quant.fp8 import FP8Linear

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
FUSED = {"self_attn.qkv_proj": PROJ[0:3], "self_attn.o_proj": PROJ[3:4], "mlp.gate_up_proj": PROJ[4:6],
         "mlp.down_proj": PROJ[6:7]}
LAYERS = 2


@pytest.fixture(scope="module")
def float_model(smol):
    """A tiny random Llama (SmolLM2's vocabulary, every projection's rows a multiple of 128)."""
    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
                      rope_theta=10000.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _linears(model):
    """HF name prefix -> float32 weight of every projection."""
    return {f"model.layers.{i}.{p}": model.get_submodule(f"model.layers.{i}.{p}").weight.detach().float()
            for i in range(LAYERS) for p in PROJ}


# --- writers: each returns (tensors to save for one layer, its reference float32 weight) -------------

def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words along dim 0, element j of a word at bit j*bits (AutoGPTQ QuantLinear.pack)."""
    per = 32 // bits
    q = q.to(torch.int64).reshape(q.shape[0] // per, per, q.shape[1])
    shifts = (torch.arange(per) * bits).reshape(1, per, 1)
    return (q << shifts).sum(1).to(torch.int32)  # the int64 -> int32 cast wraps like the uint32 it is


def _gptq(w: torch.Tensor, bits: int, group: int, sym: bool, desc_act: bool, v1: bool, gen):
    """AutoGPTQ's layout (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py ``pack``; transformers' GPTQ docs):
    qweight [k/p, n] packed along inputs, qzeros [G, n/p] along outputs, scales fp16 [G, n], g_idx [k];
    w = (q - z) * s, v1 storing z - 1."""
    n, k = w.shape
    g = k if group == -1 else group
    maxq = (1 << bits) - 1
    order = torch.randperm(k, generator=gen) if desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).to(torch.int32)  # inputs taken in ``order`` fill groups in turn
    scales = torch.empty(n, k // g)
    zeros = torch.empty(n, k // g, dtype=torch.int64)
    for j in range(k // g):
        cols = w[:, g_idx == j]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            scales[:, j] = (torch.maximum(-lo, hi) * 2 / maxq).clamp(min=1e-5)
            zeros[:, j] = (maxq + 1) // 2
        else:
            scales[:, j] = ((hi - lo) / maxq).clamp(min=1e-5)
            zeros[:, j] = torch.round(-lo / scales[:, j]).clamp(1 if v1 else 0, maxq).to(torch.int64)
    scales = scales.half()
    s, z = scales.float()[:, g_idx.long()], zeros.float()[:, g_idx.long()]
    q = torch.clamp(torch.round(w / s) + z, 0, maxq).to(torch.int64)
    ref = (q.float() - z) * s
    stored_z = zeros - (1 if v1 else 0)
    t = {"qweight": _pack_rows(q.t().contiguous(), bits), "qzeros": _pack_rows(stored_z.contiguous(), bits).t()
         .contiguous(), "scales": scales.t().contiguous(), "g_idx": g_idx}
    # _pack_rows packs along dim 0; qzeros packs along outputs: pack zeros [n, G] then transpose to [G, n/p]
    return t, ref


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _awq_pack(v: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes -> int32 [rows, cols/8]: nibble i of word j holds column 8j + AWQ_ORDER[i]
    (autoawq awq/modules/linear/gemm.py ``WQLinear_GEMM.from_linear``)."""
    v = v.to(torch.int64).reshape(v.shape[0], -1, 8)[..., AWQ_ORDER]
    return (v << (torch.arange(8) * 4)).sum(-1).to(torch.int32)


def _awq(w: torch.Tensor, group: int):
    """AutoAWQ GEMM: qweight [k, n/8], qzeros [k/g, n/8] (interleaved), scales fp16 [k/g, n]; w = (q - z) * s."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-5).half()
    zeros = torch.round(-lo / scales.float()).clamp(0, 15)
    q = torch.clamp(torch.round(wg / scales.float()[..., None]) + zeros[..., None], 0, 15)
    ref = ((q - zeros[..., None]) * scales.float()[..., None]).reshape(n, k)
    t = {"qweight": _awq_pack(q.reshape(n, k).t().contiguous()), "qzeros": _awq_pack(zeros.t().contiguous()),
         "scales": scales.t().contiguous()}
    return t, ref


def _fp8(w: torch.Tensor, kind: str):
    """vLLM's fp8 layout: float8_e4m3fn weight, weight_scale (tensor []/channel [n, 1]) or, for blocks,
    weight_scale_inv [n/128, k/128]; w = weight * scale (vllm/model_executor/layers/quantization/fp8.py)."""
    n, k = w.shape
    if kind == "block":
        blocks = w.reshape(n // 128, 128, k // 128, 128)
        s = blocks.abs().amax((1, 3)) / 448
        q = (blocks / s[:, None, :, None]).reshape(n, k).to(torch.float8_e4m3fn)
        ref = q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)
        return {"weight": q, "weight_scale_inv": s}, ref
    s = (w.abs().amax() if kind == "tensor" else w.abs().amax(1, keepdim=True)) / 448
    q = (w / s).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": s.float()}, q.float() * s


def _compressed(w: torch.Tensor, fmt: str, bits: int, strategy: str, group: int | None, sym: bool):
    """Written and decoded by compressed-tensors itself (the reference); bf16 weights as llm-compressor's."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    wt = "float" if fmt == "float-quantized" else "int"
    args = QuantizationArgs(num_bits=bits, type=wt, symmetric=sym, strategy=strategy, group_size=group)
    acts = QuantizationArgs(num_bits=8, type=wt, symmetric=True, strategy="token", dynamic=True) \
        if fmt != "pack-quantized" else None
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
    wb = w.to(torch.bfloat16)
    n, k = w.shape
    if strategy == "group":
        wg = wb.reshape(n, k // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
    elif strategy == "channel":
        lo, hi = wb.amin(1, keepdim=True), wb.amax(1, keepdim=True)
    else:
        lo, hi = wb.amin().reshape(1), wb.amax().reshape(1)
    scale, zp = calculate_qparams(lo, hi, args)
    comp = BaseCompressor.get_value_from_registry(fmt)
    sd = comp.compress({"weight": wb, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    # decoded in float32 (the library computes in the scale's dtype): the exact values the grid stands for
    ref = comp.decompress({**sd, "weight_scale": sd["weight_scale"].float()}, scheme)["weight"]
    return {k_: v for k_, v in sd.items() if v is not None}, ref.float(), scheme


def _write(d, model, tok, qcfg: dict, per_layer, skip_lm_head: bool = True):
    """Save config + tokenizer + tensors (norms, embeddings, lm_head in float; projections by ``per_layer``).
    Returns HF prefix -> reference float32 weight."""
    model.config.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(d)
    tensors, refs = {}, {}
    for name, p in model.state_dict().items():
        if not any(name.endswith(f"{x}.weight") for x in PROJ):
            tensors[name] = p.contiguous()
    for prefix, w in _linears(model).items():
        t, ref = per_layer(w)
        tensors.update({f"{prefix}.{k}": v.contiguous() for k, v in t.items()})
        refs[prefix] = ref
    save_file(tensors, str(d / "model.safetensors"))
    return refs


def _check(d, model, refs, expect_cls, generate: bool = False):
    """Every fused layer dequantizes to its references exactly; with ``generate``, greedy tokens (and prompt
    logits) also match transformers running the reference weights. Returns the loaded model."""
    from servelm.engine.models.loader import load_model

    if generate:
        llm = LLM(model=str(d), dtype="float32", device="cpu")
        ours = llm.engine.model
    else:
        ours = load_model(str(d), torch.float32, torch.device("cpu")).model
    for i in range(LAYERS):
        for name, parts in FUSED.items():
            layer = ours.get_submodule(f"layers.{i}.{name}")
            assert isinstance(layer, expect_cls), (name, type(layer))
            ref = torch.cat([refs[f"model.layers.{i}.{p}"] for p in parts])
            got = layer.dequantize(torch.float32) if hasattr(layer, "dequantize") else layer.weight.float()
            assert torch.equal(got, ref), f"layer {i} {name}: max diff {(got - ref).abs().max().item()}"
    if not generate:
        return ours
    with torch.no_grad():
        for prefix, ref in refs.items():
            model.get_submodule(prefix).weight.copy_(ref)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for out in outs:
        ids = out.prompt_token_ids
        hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
        assert out.outputs[0].token_ids == hf.tolist()
        with torch.no_grad():
            ref_logits = model(torch.tensor([ids])).logits[0]
        if expect_cls is not Int8Linear:  # Int8Linear may pick torch's int8 kernel, which rounds x to bf16
            assert (llm.engine.prompt_logits(ids) - ref_logits).abs().max().item() < 1e-3
    return ours


def _fresh(float_model):
    m = AutoModelForCausalLM.from_config(float_model.config).eval()
    m.load_state_dict(float_model.state_dict())
    return m


@pytest.mark.parametrize("bits,group,sym,desc_act,v1,held,generate", [
    (4, 128, False, False, True, Int4Linear, True),   # the common *-GPTQ-Int4: asymmetric g128, v1 zeros
    (4, 32, True, False, True, Int4Linear, False),
    (4, 64, False, False, False, Int4Linear, False),  # gptq_v2: true zero points
    (4, -1, True, False, True, Int4Linear, False),    # per channel: its scale repeated over groups of 128
    (4, 128, False, True, True, torch.nn.Linear, True),  # desc_act: inputs reordered, dequantized
    (8, -1, True, False, True, Int8Linear, False),
    (8, 128, True, False, True, torch.nn.Linear, False),
])
def test_gptq_checkpoint(tmp_path, float_model, smol, bits, group, sym, desc_act, v1, held, generate):
    gen = torch.Generator().manual_seed(1)
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": desc_act,
            "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    model = _fresh(float_model)
    refs = _write(tmp_path, model, smol.tokenizer.hf, qcfg, lambda w: _gptq(w, bits, group, sym, desc_act, v1, gen))
    _check(tmp_path, model, refs, held, generate)


@pytest.mark.parametrize("group", [128, 64])
def test_awq_checkpoint(tmp_path, float_model, smol, group):
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    model = _fresh(float_model)
    refs = _write(tmp_path, model, smol.tokenizer.hf, qcfg, lambda w: _awq(w, group))
    _check(tmp_path, model, refs, Int4Linear, generate=group == 128)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_fp8_checkpoint(tmp_path, float_model, smol, kind):
    qcfg = {"quant_method": "fp8", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128] if kind == "block" else None}
    model = _fresh(float_model)
    refs = _write(tmp_path, model, smol.tokenizer.hf, qcfg, lambda w: _fp8(w, kind))
    ours = _check(tmp_path, model, refs, FP8Linear, generate=kind != "tensor")
    assert ours.layers[0].mlp.down_proj.weight_fp8.dtype == torch.float8_e4m3fn  # one byte a weight


@pytest.mark.parametrize("fmt,bits,strategy,group,sym,held,generate", [
    ("pack-quantized", 4, "group", 128, True, Int4Linear, True),    # W4A16
    ("pack-quantized", 4, "group", 32, False, Int4Linear, False),   # W4A16 asymmetric
    ("pack-quantized", 4, "channel", None, True, Int4Linear, False),
    ("pack-quantized", 8, "channel", None, True, Int8Linear, False),  # W8A16
    ("int-quantized", 8, "channel", None, True, Int8Linear, True),    # W8A8 int8 (weight-only here)
    ("float-quantized", 8, "channel", None, True, FP8Linear, True),   # FP8 dynamic
    ("float-quantized", 8, "tensor", None, True, FP8Linear, False),
])
def test_compressed_tensors_checkpoint(tmp_path, float_model, smol, fmt, bits, strategy, group, sym, held,
                                       generate):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    schemes = []

    def per_layer(w):
        t, ref, scheme = _compressed(w, fmt, bits, strategy, group, sym)
        schemes.append(scheme)
        return t, ref

    model = _fresh(float_model)
    # the config is written after the tensors: it names the scheme the library used
    refs = _write(tmp_path, model, smol.tokenizer.hf, {}, per_layer)
    qcfg = QuantizationConfig(config_groups={"group_0": schemes[0]}, format=fmt, quantization_status="compressed",
                              ignore=["lm_head"]).model_dump(mode="json")
    qcfg["quant_method"] = "compressed-tensors"
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _check(tmp_path, model, refs, held, generate)


@pytest.mark.parametrize("qcfg,field", [
    ({"quant_method": "bitsandbytes"}, "quant_method"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, "version"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}}, "format"),
])
def test_unsupported_quantization_config_names_the_field(tmp_path, float_model, smol, qcfg, field):
    from servelm.engine.models.loader import load_model

    model = _fresh(float_model)
    _write(tmp_path, model, smol.tokenizer.hf, qcfg, lambda w: _awq(w, 128))
    with pytest.raises(ModelLoadError, match=f"quantization_config.{field} = "):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))


def test_a_tensor_that_disagrees_with_the_config_is_named(tmp_path, float_model, smol):
    model = _fresh(float_model)
    # scales written for groups of 64 but the config says 128
    _write(tmp_path, model, smol.tokenizer.hf, {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                "version": "gemm"}, lambda w: _awq(w, 64))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.q_proj\.scales"):
        LLM(model=str(tmp_path), dtype="float32", device="cpu")  # as a user starts it: the message reaches them
