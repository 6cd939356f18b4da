"""Triton weight-only kernels (quant/triton_gemv.py) against the dequantized reference matmul, and greedy
decode through them equal to the path they replace.

Tolerance: relative Frobenius error < 1e-2 against a float32 product of the same (dequantized) weights.
The kernels accumulate in fp32 and round the output to bf16/fp16 once (~4e-3 relative); the dot path
also rounds each dequantized int4 weight to x's dtype first.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from servelm.engine import LLM, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from servelm.engine.quant import Int4Linear, Int8Linear, cuda_w4, kernels  # noqa: E402
from servelm.engine.quant import triton_gemv as tg  # noqa: E402
from servelm.engine.quant.int4 import quantize_int4  # noqa: E402
from servelm.engine.quant.int8 import quantize_int8  # noqa: E402

DEV = torch.device("cuda")
TOL = 1e-2
ROWS = [1, 2, 3, 5, 8, 13, 16, 40]
# (N, K): odd N, K not a multiple of any block size (but of the int4 group), one 8B shape
SHAPES = [(37, 384), (1001, 1408), (4096, 4096), (333, 2176)]
# explicit blocks: gemv and dot, with and without split-K (the last slice of K partly empty)
CONFIGS = [None, tg.Config(1, 16, 512, 3), tg.Config(1, 256, 128, 8), tg.Config(16, 32, 256, 4, 4, 2),
           tg.Config(64, 64, 128, 2)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(out, ref, m, n, dtype):
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel(out, ref) < TOL


def usable(cfg, m):
    return cfg is None or (cfg.block_m == 1) == (m == 1)


W4_CASES = [(g, n, k, torch.bfloat16) for g in (32, 64, 128) for n, k in SHAPES] + [(64, 1001, 1408, torch.float16)]


@pytest.mark.parametrize(("group", "n", "k", "dtype"), W4_CASES)
def test_w4_matches_dequantized_reference(group, n, k, dtype):
    w = torch.randn(n, k, device=DEV) * 0.05
    q, s, z = quantize_int4(w, group)
    sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = tg.pack_int4(q, group)
    assert torch.equal(tg.unpack_int4(packed, group).int(), q)
    s16, z16 = sz.float().transpose(0, 1).unbind(-1)  # the kernel reads bf16 scales
    deq = ((q.reshape(n, k // group, group) - 8) * s16[..., None] + z16[..., None]).reshape(n, k)
    for m in ROWS:
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        for cfg in CONFIGS:
            if usable(cfg, m) and (cfg is None or cfg.block_k % group == 0):
                check(tg.w4_matmul(x, packed, sz, group, cfg), x.float() @ deq.t(), m, n, dtype)


# whole 16-row tiles and 64-input blocks; K = 22 and 34 blocks leave the last warps' slices short or empty
MMA_SHAPES = [(32, 128), (1008, 1408), (4096, 4096), (336, 2176)]
MMA_CONFIGS = [cuda_w4.DEFAULT, (1, 1, 4), (8, 1, 8), (2, 2, 16), (8, 2, 4)]


@pytest.mark.parametrize(("group", "n", "k"), [(g, n, k) for g in (64, 128, 256) for n, k in MMA_SHAPES if k % g == 0])
def test_cuda_w4_matches_dequantized_reference(group, n, k):
    """The tensor-core kernel (quant/cuda_w4.py) at every row count (passes of 8, 16, 32 rows), several
    work splits, and its dequantize kernel against the same weights dequantized in fp32."""
    assert cuda_w4.available(DEV), cuda_w4._FAILED
    w = torch.randn(n, k, device=DEV) * 0.05
    q, s, z = quantize_int4(w, group)
    sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = cuda_w4.pack(q)
    assert torch.equal(cuda_w4.unpack(packed).int(), q)
    s16, z16 = sz.float().transpose(0, 1).unbind(-1)
    deq = ((q.reshape(n, k // group, group) - 8) * s16[..., None] + z16[..., None]).reshape(n, k)
    d = cuda_w4.dequantize(packed, sz, group)
    assert d.dtype == torch.bfloat16 and rel(d, deq) < 4e-3  # one bf16 rounding per weight
    for m in ROWS + [33]:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        for cfg in MMA_CONFIGS:
            check(cuda_w4.matmul(x, packed, sz, group, cfg), x.float() @ deq.t(), m, n, torch.bfloat16)
    x = torch.randn(3, 2 * k, device=DEV, dtype=torch.bfloat16)[:, ::2]  # strided rows are copied first
    check(cuda_w4.matmul(x, packed, sz, group), x.float() @ deq.t(), 3, n, torch.bfloat16)


@pytest.mark.parametrize(("n", "k", "dtype"), [(n, k, torch.bfloat16) for n, k in SHAPES + [(129, 1000)]]
                         + [(1001, 1408, torch.float16)])
def test_w8_and_w16_match_reference(n, k, dtype):
    w = torch.randn(n, k, device=DEV) * 0.05
    q, scale = quantize_int8(w)
    w16 = w.to(dtype)
    for m in ROWS:
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        for cfg in CONFIGS:
            if usable(cfg, m):
                check(tg.w8_matmul(x, q, scale, cfg), (x.float() @ q.float().t()) * scale, m, n, dtype)
                check(tg.w16_matmul(x, w16, cfg), x.float() @ w16.float().t(), m, n, dtype)


@pytest.mark.parametrize("kernel", ["triton_w4", "triton_w8", "cuda_w4", None])
def test_modules_match_their_dequantized_weight(kernel):
    """Int4Linear/Int8Linear on CUDA, through the Triton or tensor-core kernels (forced) or whatever
    measured fastest, match their own dequantize(); a non-contiguous input (a column slice) is handled."""
    kernels.force(kernel)
    try:
        lin = torch.nn.Linear(1024, 3008, bias=True, device=DEV, dtype=torch.bfloat16)
        x = torch.randn(4, 2048, device=DEV, dtype=torch.bfloat16)[:, ::2]
        int4 = Int4Linear(lin, 64)
        expected = {"triton_w4": ("gemv",), "cuda_w4": ("mma",)}.get(kernel, ("gemv", "tinygemm", "mma"))
        assert int4.layout in expected
        for mod in (int4, Int8Linear(lin)):
            ref = x.float() @ mod.dequantize().t() + lin.bias.float()
            for rows in (1, 4):
                assert rel(mod(x[:rows]), ref[:rows]) < TOL
    finally:
        kernels.force(None)


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [100, 200, 300], [4242] * 12, [17, 99, 1234, 5, 42]]


def greedy(quant, kernel):
    """Greedy tokens (with top-5 logprobs) of a random-weight SmolLM2-shaped model (bf16 on CUDA,
    CUDA graphs for batch 1..4) with `kernel` forced wherever it is a candidate."""
    kernels.force(kernel)
    try:
        cfg = EngineConfig(model="dummy:smollm2-135m", device="cuda", dtype="bfloat16", quantization=quant,
                           max_num_seqs=4, kv_cache_memory_bytes=1 << 30)
        llm = LLM.from_engine(LLMEngine(cfg))
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=5))
        return [o.outputs[0] for o in outs]
    finally:
        kernels.force(None)


@pytest.mark.parametrize(("quant", "existing", "new"), [("int4", "tinygemm", "triton_w4"),
                                                        ("int4", "tinygemm", "cuda_w4"),
                                                        ("int8", "dequant_matmul", "triton_w8")])
def test_greedy_decode_equals_existing_path(quant, existing, new):
    """Same tokens as the path the kernel replaces. Two correct kernels that sum in a different order
    may still part at a near-tie of the top two logits (random weights have many): there each
    path's token must be among the other's top 5, and the comparison stops (vLLM's
    check_logprobs_close). Most of the tokens must match."""
    matched = total = 0
    for a, b in zip(greedy(quant, existing), greedy(quant, new)):
        assert len(a.token_ids) == len(b.token_ids) == 32
        i = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        matched, total = matched + i, total + len(a.token_ids)
        if i < len(a.token_ids):
            assert a.token_ids[i] in {t.token_id for t in b.logprobs[i].top}
            assert b.token_ids[i] in {t.token_id for t in a.logprobs[i].top}
    assert matched >= total // 2, f"only {matched} of {total} tokens before the paths parted"
