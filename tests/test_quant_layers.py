"""Each quantized Linear multiplies like its own dequantized weight, stores what it claims,
and rejects bad settings with a message naming the fix."""
import pytest
import torch
from torch import nn

from servelm.engine.quant import (Int4Linear, Int8Linear, NF4Linear, QuantConfig, kernels, on_int4_grid,
                                  parse_dtype, quantize_model)

# Tolerance: relative to the output's max magnitude. fp32 paths agree to float rounding; bf16
# activations (what the packed CPU kernels take) carry bf16's 8-bit mantissa, ~0.4% per product sum.
TOL = {torch.float32: 2e-2, torch.bfloat16: 2e-2}
FORMATS = ["int8", "int4", "nf4", "nf4-dq"]


def _make(method, n=192, k=256, g=None, bias=False):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    if method == "int8":
        return lin, Int8Linear(lin)
    if method == "int4":
        return lin, Int4Linear(lin, g or 64)
    return lin, NF4Linear(lin, g or 64, double_quant=method == "nf4-dq")


@pytest.mark.parametrize("method", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_matches_dequantized_reference(method, dtype, m):
    lin, q = _make(method, bias=True)
    x = torch.randn(m, lin.in_features).to(dtype)
    ref = x.float() @ q.dequantize().t() + lin.bias.detach()
    y = q(x)
    assert y.dtype == dtype and y.shape == (m, lin.out_features)
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < TOL[dtype], f"{method} {dtype} m={m}: rel err {err:.4f}"


@pytest.mark.parametrize("method,max_rel", [("int8", 0.01), ("int4", 0.12), ("nf4", 0.12), ("nf4-dq", 0.12)])
def test_dequantized_weight_is_close_to_original(method, max_rel):
    lin, q = _make(method)
    w = lin.weight.detach()
    assert ((q.dequantize() - w).norm() / w.norm()) < max_rel


def test_3d_input_keeps_shape():
    lin, q = _make("int4")
    x = torch.randn(2, 3, lin.in_features)
    assert q(x).shape == (2, 3, lin.out_features)


def test_a_layer_remembers_its_kernel_per_batch_size_and_forgets_it_when_forced():
    """The measured kernel is kept per (device, dtype, batch bucket); force() and reset() make layers choose
    again, so a kernel forced after loading takes effect."""
    lin, q = _make("int8")
    one, many = torch.randn(1, lin.in_features), torch.randn(64, lin.in_features)
    assert q.kernel_for(one) is None
    ref = q(one)
    measured = q.kernel_for(one)
    assert measured in ("int8pack_bf16", "int8pack_native", "dequant_matmul") and q.kernel_for(many) is None
    assert torch.equal(q(one), ref)  # the remembered kernel gives the same product
    try:
        kernels.force("dequant_matmul")
        assert q.kernel_for(one) is None
        q(one)
        assert q.kernel_for(one) == "dequant_matmul"
    finally:
        kernels.force(None)
    assert q.kernel_for(one) is None


@pytest.mark.parametrize("g", [16, 32, 64])
def test_nf4_dq_stores_fewer_bytes_than_nf4(g):
    _, a = _make("nf4", g=g)
    _, b = _make("nf4-dq", g=g)
    assert b.weight_nbytes() < a.weight_nbytes()
    n, k = a.out_features, a.in_features
    assert a.weight_nbytes() < n * k * 2 * 0.4  # well under half of bf16
    assert b.weight_nbytes() * 8 / (n * k) < 4 + 9 / g  # 4-bit codes + an 8-bit scale per group + a little


def test_int8_row_scale_search_beats_absmax_on_an_outlier_row():
    # Heavy-tailed rows (one large weight sets absmax): the searched per-row clip point is never
    # worse than plain absmax scales on any row and lowers the total squared error (by little:
    # with 255 levels, rounding error is small next to what clipping costs).
    torch.manual_seed(2)
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02
    from servelm.engine.quant.int8 import quantize_int8

    q, s = quantize_int8(w)
    qa, sa = quantize_int8(w, clip_factors=(1.0,))
    err = ((q.float() * s[:, None] - w) ** 2).sum(1)
    err_absmax = ((qa.float() * sa[:, None] - w) ** 2).sum(1)
    assert (err <= err_absmax).all() and err.sum() < err_absmax.sum()
    assert q.dtype == torch.int8 and q.abs().max() <= 127


@pytest.mark.parametrize("dq", [False, True])
def test_nf4_scale_search_weighted_by_calibration_statistics(dq):
    # Inputs with very different activation scales: the importance-weighted scale search must
    # lower the output error against absmax scales, and the layer still multiplies like its
    # own dequantized weight.
    torch.manual_seed(3)
    lin = nn.Linear(256, 128, bias=False)
    x = torch.randn(512, 256) * torch.linspace(0.1, 3.0, 256)
    imp = (x * x).mean(0)
    plain = NF4Linear(lin, 32, double_quant=dq)
    searched = NF4Linear(lin, 32, double_quant=dq, importance=imp)
    ref = x @ lin.weight.detach().t()
    err = lambda q: ((x @ q.dequantize().t() - ref) ** 2).sum()
    assert err(searched) < 0.9 * err(plain)
    assert searched.weight_nbytes() == plain.weight_nbytes()
    y, yref = searched(x[:5]), x[:5] @ searched.dequantize().t()
    assert (y - yref).abs().max() / yref.abs().max() < TOL[torch.float32]


def test_nf4_dq_search_sees_the_8_bit_scale_it_stores():
    # Double quantization rounds every searched scale to an int8 code; searching the codes next
    # to it (and picking the NF4 codes for the stored scale) is never worse per group than plain
    # rounding, and better overall. The module decodes exactly the scale it searched.
    from servelm.engine.quant.nf4 import NF4_CODE, dequantize_scales, double_quantize, search_scales

    torch.manual_seed(4)
    lin = nn.Linear(512, 96, bias=False)
    with torch.no_grad():  # rows of very different size, as in real layers: coarse int8 scale steps
        lin.weight.mul_(torch.exp(torch.randn(96, 1) * 1.5))
    imp = torch.rand(512) ** 4 * 10
    w = lin.weight.detach()
    q, step, mean = double_quantize(search_scales(w, 32, imp), 256)
    plain = dequantize_scales(q, step, mean, 96 * 16).reshape(96, 16, 1)
    wg = w.reshape(96, 16, 32)
    plain_w = NF4_CODE[torch.bucketize(wg / plain, (NF4_CODE[1:] + NF4_CODE[:-1]) / 2)] * plain
    searched = NF4Linear(lin, 32, double_quant=True, importance=imp)
    group_err = lambda v: (imp.reshape(16, 32) * (v.reshape(96, 16, 32) - wg) ** 2).sum(-1)
    e_searched, e_plain = group_err(searched.dequantize()), group_err(plain_w)
    assert (e_searched <= e_plain * (1 + 1e-6)).all()
    assert (e_searched / e_plain).mean() < 0.95, (e_searched / e_plain).mean()  # small rows gain most
    assert searched.absmax_q.dtype == torch.int8


def test_nf4_group_size_errors_name_the_fix():
    with pytest.raises(ValueError, match="positive even number"):
        QuantConfig.parse("nf4-dq:g15")
    model = nn.Sequential(nn.Linear(80, 64))
    with pytest.raises(ValueError, match=r"nf4-dq group_size 64 does not divide in_features 80"):
        quantize_model(model, "nf4-dq:g64")
    with pytest.raises(ValueError, match=r"nf4 group_size 32 does not divide in_features 80"):
        NF4Linear(model[0], 32)


def test_calibration_text_that_cannot_be_used_is_a_clear_error(tmp_path):
    from servelm.engine.quant import calibration_windows

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return list(range(len(text.split())))

    with pytest.raises(ValueError, match="cannot be read"):
        calibration_windows(Tok(), str(tmp_path / "missing.txt"))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="at least 64"):
        calibration_windows(Tok(), str(tmp_path / "short.txt"))
    (tmp_path / "ok.txt").write_text("word " * 3000)
    wins = calibration_windows(Tok(), str(tmp_path / "ok.txt"), ctx=512, windows=4)
    assert len(wins) == 4 and all(len(w) == 512 for w in wins)


def test_int4_reproduces_a_q4_1_grid_exactly():
    # Build a weight the way GGUF Q4_1 stores it: per block of 32, w = q*d + m with fp16 d, m.
    torch.manual_seed(1)
    n, k = 128, 256
    q = torch.randint(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's Q4_1 is min/max: both ends always occur
    d = (torch.rand(n, k // 32, 1) * 0.02 + 1e-3).half().float()
    # real blocks are roughly centred: min ≈ -max, so m ≈ -7.5 d
    m = (-(7.5 + torch.randn(n, k // 32, 1)) * d).half().float()
    w = (q * d + m).reshape(n, k)
    assert on_int4_grid(w, 32) and not on_int4_grid(torch.randn(n, k), 32)
    lin = nn.Linear(k, n, bias=False)
    lin.weight.data = w.clone()
    model = nn.Sequential(lin)
    rep = quantize_model(model, "int4")
    assert rep.group_size == 32 and "grid" in rep.group_size_reason
    assert torch.equal(model[0]._codes().reshape(n, k // 32, 32).long(), q)  # the very same codes
    # scale/zero are kept in bf16 (the kernels' format): off the grid by well under a step
    step = d.reshape(n, k // 32).repeat_interleave(32, 1)
    assert ((model[0].dequantize() - w).abs() / step).max() < 0.05


def test_quantize_model_replaces_linears_and_reports_bytes():
    torch.manual_seed(0)
    model = nn.ModuleDict({"up": nn.Linear(256, 512, bias=False), "down": nn.Linear(512, 256, bias=False),
                           "lm_head": nn.Linear(256, 1000, bias=False)})
    rep = quantize_model(model, QuantConfig("int4", 128))
    assert isinstance(model["up"], Int4Linear) and isinstance(model["down"], Int4Linear)
    assert isinstance(model["lm_head"], nn.Linear)  # lm_head only when asked
    assert len(rep.layers) == 2
    assert rep.linear_bytes_before == (256 * 512 * 2) * 4
    assert rep.linear_bytes_after < rep.linear_bytes_before / 6
    assert rep.other_bytes == 256 * 1000 * 4
    model2 = nn.ModuleDict({"lm_head": nn.Linear(256, 1000, bias=False)})
    quantize_model(model2, QuantConfig("int8", include_lm_head=True))
    assert isinstance(model2["lm_head"], Int8Linear)


def test_unknown_format_lists_valid_ones():
    with pytest.raises(ValueError, match="int8.*int4.*nf4.*nf4-dq"):
        QuantConfig.parse("int3")
    with pytest.raises(ValueError, match="valid: float32, bfloat16, float16"):
        parse_dtype("float8")


def test_group_size_that_does_not_divide_names_both_numbers():
    model = nn.Sequential(nn.Linear(96, 64))
    with pytest.raises(ValueError, match=r"group_size 64 does not divide in_features 96"):
        quantize_model(model, "int4:g64")
    assert isinstance(model[0], nn.Linear)  # untouched on error


def test_bad_combinations():
    with pytest.raises(ValueError, match="int8 is per output channel"):
        QuantConfig.parse("int8:g32")
    with pytest.raises(ValueError, match=r"int4 group_size must be one of \(32, 64, 128, 256\)"):
        QuantConfig.parse("int4:g48")


def test_parse_spellings():
    assert QuantConfig.parse("INT4-g32").group_size == 32
    assert QuantConfig.parse("nf4-dq:64").method == "nf4-dq"
    assert QuantConfig.parse(None).method is None and QuantConfig.parse("none").method is None
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16


def test_ladder_computed_bytes_match_measured_modules():
    from servelm.engine.quant.report import linear_bytes

    for method, g in [("int8", None), ("int4", 64), ("nf4", 64), ("nf4-dq", 64), ("nf4", 16), ("nf4-dq", 16)]:
        _, q = _make(method, g=g)
        assert linear_bytes(method, q.out_features, q.in_features, g) == q.weight_nbytes(), method


def test_quantize_cli_prints_the_ladder(capsys):
    from servelm.engine.quant.cli import main

    assert main(["--report", "dummy:llama-2-7b", "--include-lm-head", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)["formats"]
    assert r["fp16"]["computed_bytes"] / 1e9 == pytest.approx(13.48, abs=0.05)
    assert r["int8"]["computed_bytes"] / 1e9 < 7.2 and r["int4"]["computed_bytes"] / 1e9 < 3.8
    assert r["nf4-dq"]["computed_bytes"] < r["nf4"]["computed_bytes"]
    assert main(["--report", "dummy:llama-2-7b", "--group-size", "16", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["formats"]
    assert r["nf4-dq"]["group_size"] == 16 and r["int4"]["group_size"] == 128  # int4 has no g16 kernel
    assert r["nf4-dq"]["projection_bits_per_weight"] == pytest.approx(4.5, abs=0.01)
    assert r["nf4"]["projection_bits_per_weight"] == pytest.approx(6.0)
    assert main(["--report", "/no/such/model"]) == 2
    assert "model path not found" in capsys.readouterr().err


def test_int8_lm_head_next_to_int4_layers_keeps_a_tied_embedding():
    """`int4+lm_head:int8`: projections int4, lm_head per-row int8, the tied embedding table untouched."""
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 256)
    model = nn.ModuleDict({"embed": emb, "up": nn.Linear(256, 512, bias=False),
                           "lm_head": nn.Linear(256, 1000, bias=False)})
    model["lm_head"].weight = emb.weight
    table = emb.weight.detach().clone()
    cfg = QuantConfig.parse("int4:g128+lm_head:int8")
    assert cfg.label() == "int4:g128+lm_head:int8"
    rep = quantize_model(model, cfg)
    assert isinstance(model["up"], Int4Linear) and isinstance(model["lm_head"], Int8Linear)
    assert [l.method for l in rep.layers] == ["int4", "int8"]
    assert torch.equal(model["embed"].weight, table)
    x = torch.randn(3, 256)
    ref = x @ table.t()
    assert ((model["lm_head"](x) - ref).norm() / ref.norm()) < 0.01
    with pytest.raises(ValueError, match="valid: int8"):
        QuantConfig("int4", lm_head_method="int4")
