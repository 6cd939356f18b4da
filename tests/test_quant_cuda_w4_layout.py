"""The tensor-core int4 kernel's weight layout (quant/cuda_w4.py), checked on the CPU.

The kernel itself needs a GPU (tests/test_gpu_gemv.py runs it); what can go wrong without one is the
packing: which code each lane's word holds, and which activations the lane pairs it with. This test
replays the kernel's reads lane by lane with the operand layout of PTX ``mma.m16n8k16`` (A row-major
16 x 16, B column-major 16 x 8, C 16 x 8 as the PTX ISA documents them) and checks that the sum of the
instructions' products is x @ q^T.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from servelm.engine.quant import cuda_w4


@pytest.mark.parametrize(("n", "k"), [(16, 64), (48, 256), (64, 1024)])
def test_pack_unpack_roundtrip(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = cuda_w4.pack(q)
    assert packed.shape == (n // 16, k // 64, 32, 4) and packed.dtype == torch.int32
    assert torch.equal(cuda_w4.unpack(packed).int(), q)


def _emulate(packed: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Y [M<=8, N] as the kernel computes it, with codes in place of dequantized weights."""
    tiles, kb = packed.shape[:2]
    m = x.shape[0]
    y = np.zeros((m, tiles * 16))
    lanes = np.arange(32)
    g, t = lanes >> 2, lanes & 3
    for tile in range(tiles):
        c_acc = np.zeros((16, 8))
        for b in range(kb):
            for c in range(4):
                w = packed[tile, b, :, c].astype(np.int64) & 0xFFFFFFFF  # one word per lane
                a = np.zeros((16, 16))
                # a[i] = lop3 on (w >> 4i): low half bits 0-3, high half bits 16-19 of the shifted word
                for i, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                    a[row, col] = (w >> (4 * i)) & 15
                    a[row, col + 1] = (w >> (4 * i + 16)) & 15
                bm = np.zeros((16, 8))
                base = b * 64 + 16 * t + 4 * c  # lane (g, t) holds x[g, base .. base+3] in b0..b3
                ok = g < m
                xr = np.zeros((32, 4))
                xr[ok] = np.stack([x[g[ok], base[ok] + e] for e in range(4)], axis=1)
                bm[2 * t, g], bm[2 * t + 1, g], bm[2 * t + 8, g], bm[2 * t + 9, g] = xr.T
                c_acc += a @ bm
        # C: lane (g, t) holds c0, c1 = C[g, 2t], C[g, 2t+1]; c2, c3 = C[g+8, ...]: column = batch row
        y[:, tile * 16:(tile + 1) * 16] = c_acc[:, :m].T
    return y


@pytest.mark.parametrize(("m", "n", "k"), [(1, 16, 64), (3, 32, 128), (8, 16, 192)])
def test_lanes_multiply_the_right_codes_and_activations(m, n, k):
    torch.manual_seed(0)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    x = torch.randn(m, k, dtype=torch.float64)
    y = _emulate(cuda_w4.pack(q).numpy(), x.numpy())
    np.testing.assert_allclose(y, (x @ q.double().t()).numpy(), rtol=1e-12, atol=1e-9)


def test_supported_shapes():
    assert cuda_w4.supports(4096, 4096, 128) and cuda_w4.supports(28672, 4096, 64)
    assert not cuda_w4.supports(4096, 4096, 32)  # a 64-input block would span two groups
    assert not cuda_w4.supports(4100, 4096, 128)  # not whole 16-row tiles
    assert not cuda_w4.supports(4096, 4096, 192)  # group not a power of two
    assert not cuda_w4.available(torch.device("cpu"))
