"""quantize -> generate, end to end through the public engine API, on the embedded SmolLM2 GGUF."""
import pytest
import torch

from servelm.engine import LLM, EngineConfig, LLMEngine, SamplingParams
from servelm.engine.quant import Int4Linear, QuantLinear

PROMPT = "The capital of France is"


CALIBRATION = ("The river flows through the old town, past the market and the cathedral, before it "
               "reaches the harbour. Farmers bring vegetables, cheese and bread to the market every "
               "Saturday morning, and the cafes around the square fill with visitors. ") * 12


@pytest.mark.parametrize("quant", ["int8", "int4", "nf4", "nf4-dq+lm_head"])
def test_generate_in_every_format(quant, clone_smol, tmp_path):
    calib = None
    if quant == "nf4":  # nf4 with block scales searched on calibration text's activations
        calib = tmp_path / "calib.txt"
        calib.write_text(CALIBRATION)
    engine = LLMEngine(EngineConfig(dtype="bfloat16", device="cpu", quantization=quant, max_num_seqs=2,
                                    quant_calibration=calib and str(calib)),
                       loaded=clone_smol(torch.bfloat16))
    assert ("calibration tokens" in engine.quant_report.group_size_reason) == (calib is not None)
    llm = LLM.from_engine(engine)
    rep = llm.engine.quant_report
    assert len(rep.layers) == 30 * 4 + quant.endswith("+lm_head")
    assert all(isinstance(m, QuantLinear) for n, m in llm.engine.model.named_modules() if n.endswith("_proj"))
    assert rep.linear_bytes_after < rep.linear_bytes_before * (0.55 if quant == "int8" else 0.35)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0]
    assert 1 <= len(out.token_ids) <= 3
    assert "Paris" in out.text, f"{quant}: {out.text!r}"


def test_int4_keeps_the_q4_1_grid_of_the_gguf(clone_smol):
    """The GGUF's projections are Q4_1 (w = q*d + m per 32 inputs); int4 at the auto group size
    lines up with those blocks, so the quantized weights equal the loaded ones to bf16 rounding
    of the scales (a careless re-quantization would be off by a large part of a step)."""
    loaded = clone_smol(torch.float32)
    w = loaded.model.layers[3].mlp.down_proj.weight.detach().clone()
    from servelm.engine.quant import quantize_model

    rep = quantize_model(loaded.model, "int4", loaded.source_qtypes)
    assert rep.group_size == 32 and "Q4_1" in rep.group_size_reason
    q = loaded.model.layers[3].mlp.down_proj
    assert isinstance(q, Int4Linear)
    step = (q.scales_zeros[..., 0].float().t()).repeat_interleave(32, 1)
    assert ((q.dequantize() - w).abs() / step).max() < 0.06
