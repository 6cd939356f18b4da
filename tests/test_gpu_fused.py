"""Fused RMSNorm / RoPE / SiLU-and-multiply kernels against the model's PyTorch code (float32 reference),
and RoPE fused with the K/V store against the two kernels it replaces."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from servelm.engine.attention.triton_kernels import store_kv  # noqa: E402
from servelm.engine.fused import add_rms_norm, rms_norm, rope, rope_store_kv, silu_mul  # noqa: E402
from servelm.engine.models.config import preset  # noqa: E402
from servelm.engine.models.llama import RMSNorm, RotaryEmbedding  # noqa: E402

DEV = torch.device("cuda")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 4096), (7, 576), (300, 896), (33, 5120)])
def test_rms_norm(tokens, hidden, dtype):
    x = torch.randn(tokens, hidden, device=DEV, dtype=dtype) * 3
    norm = RMSNorm(hidden, 1e-5).to(DEV)
    norm.weight.data = torch.randn(hidden, device=DEV)
    ref = norm(x.float())
    out = rms_norm(x, norm.weight.to(dtype), 1e-5)
    assert out.shape == x.shape and rel(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 4096), (7, 576), (300, 896)])
def test_add_rms_norm(tokens, hidden, dtype):
    """The residual add fused into the norm: the stream is exactly the eager ``x + residual``, the norm of it
    matches the float32 reference."""
    x = torch.randn(tokens, 2 * hidden, device=DEV, dtype=dtype)[:, :hidden]  # strided, as a split output is
    res = torch.randn(tokens, hidden, device=DEV, dtype=dtype) * 4
    norm = RMSNorm(hidden, 1e-5).to(DEV)
    norm.weight.data = torch.randn(hidden, device=DEV)
    out, stream = add_rms_norm(x, res, norm.weight.to(dtype), 1e-5)
    assert torch.equal(stream, x + res)
    ref, ref_stream = norm(x.float(), res.float())
    assert out.shape == x.shape and rel(out, ref) < 1e-2 and rel(stream, ref_stream) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["llama-3-8b", "smollm2-135m", "qwen2-0.5b"])
def test_rope(shape, dtype):
    cfg = preset(shape)
    cfg.max_position_embeddings = 4096
    r = RotaryEmbedding(cfg).to(DEV)
    T = 37
    pos = torch.randint(0, 4096, (T,), device=DEV)
    qkv = torch.randn(T, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, device=DEV, dtype=dtype)
    q = qkv[:, :cfg.num_heads * cfg.head_dim].view(T, cfg.num_heads, cfg.head_dim)  # strided, as in the model
    k = qkv[:, cfg.num_heads * cfg.head_dim:(cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim].view(
        T, cfg.num_kv_heads, cfg.head_dim)
    rq, rk = r(pos, q.float(), k.float())
    fq, fk = rope(pos, q, k, r.cos, r.sin)
    assert rel(fq, rq) < 1e-2 and rel(fk, rk) < 1e-2

    # the same rotation with K (rotated) and V written to their slots in one kernel; slot -1 writes nothing
    v = qkv[:, (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim:].view(T, cfg.num_kv_heads, cfg.head_dim)
    blocks, bs = 8, 16
    slots = torch.randperm(blocks * bs, device=DEV)[:T]
    slots[::5] = -1
    cache = torch.randn(2, blocks, bs, cfg.num_kv_heads, cfg.head_dim, device=DEV, dtype=dtype)
    caches = [cache, cache.clone()]
    store_kv(fk, v, caches[0][0], caches[0][1], slots)
    sq = rope_store_kv(pos, q, k, v, r.cos, r.sin, caches[1][0], caches[1][1], slots)
    assert torch.equal(sq, fq) and torch.equal(caches[1], caches[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "inter"), [(1, 14336), (5, 1536), (64, 4864)])
def test_silu_mul(tokens, inter, dtype):
    x = torch.randn(tokens, 2 * inter, device=DEV, dtype=dtype)
    g, u = x.float().split(inter, dim=-1)
    assert rel(silu_mul(x), F.silu(g) * u) < 1e-2
