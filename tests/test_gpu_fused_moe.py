"""The fused MoE kernel (grouped GEMM over the routed experts, top-k weights applied in the kernel) against the
per-expert PyTorch reference, and a token's result alone against the same token in a batch."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from servelm.engine.fused_moe import fused_moe  # noqa: E402
from servelm.engine.models.moe import moe_reference, route  # noqa: E402

DEV = torch.device("cuda")


def _case(tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(tokens, hidden, device=DEV, dtype=dtype, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, device=DEV, dtype=dtype, generator=g) * hidden ** -0.5
    w2 = torch.randn(experts, hidden, inter, device=DEV, dtype=dtype, generator=g) * inter ** -0.5
    logits = torch.randn(tokens, experts, device=DEV, generator=g)
    weights, ids = route(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "hidden", "inter", "experts", "top_k"),
                         [(1, 2048, 768, 128, 8), (7, 512, 192, 8, 2), (300, 1024, 256, 64, 6), (33, 96, 40, 16, 4)])
def test_fused_moe_equals_the_reference(tokens, hidden, inter, experts, top_k, dtype):
    x, w13, w2, weights, ids = _case(tokens, hidden, inter, experts, top_k, dtype)
    want = moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
    got = fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == dtype and got.shape == want.shape
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


def test_fused_moe_token_is_batch_invariant():
    x, w13, w2, weights, ids = _case(64, 512, 128, 32, 4, torch.bfloat16, seed=1)
    batch = fused_moe(x, w13, w2, weights, ids)
    for t in (0, 17, 63):
        alone = fused_moe(x[t:t + 1], w13, w2, weights[t:t + 1], ids[t:t + 1])
        assert torch.equal(alone[0], batch[t])
