"""The native GGUF kernels: exact dequantization, products close to float, batch invariance, bad types."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from servelm.engine import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler to build the native kernels")

ALL = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
# byte offsets of the fp16 scale fields inside one block, which random bytes must not turn into inf/nan
SCALE_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
                T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_weight(qtype, n, k, seed=0):
    """Random GGUF bytes [n, row_bytes] of ``qtype``: raw random blocks with sane fp16 scales."""
    rng = np.random.default_rng(seed)
    if qtype in (T.F32, T.F16, T.BF16):
        w = rng.standard_normal((n, k)).astype(np.float32)
        raw = gguf.quants.quantize(w, qtype).view(np.uint8).reshape(n, -1)
        return torch.from_numpy(np.ascontiguousarray(raw))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        scale = rng.uniform(0.001, 0.05, size=raw.shape[0]) * rng.choice([-1, 1], size=raw.shape[0])
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1).copy())


def reference(raw, qtype, n, k):
    return torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).reshape(n, k).astype(np.float32))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_equals_gguf_exactly(qtype):
    n, k = 7, 512
    raw = random_weight(qtype, n, k)
    assert raw.shape[1] == native.row_bytes(qtype, k)
    ref = reference(raw, qtype, n, k)
    got = native.dequantize(raw, qtype, n, k)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # bitwise, including -0.0
    rows = [5, 0, 5, 3]
    assert torch.equal(native.dequantize(raw, qtype, n, k, rows=rows), ref[rows])


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_matmul_close_to_float_product(qtype):
    n, k, m = 40, 768 if qtype not in (T.Q4_K, T.Q5_K, T.Q6_K) else 1024, 5
    raw = random_weight(qtype, n, k, seed=1)
    w = reference(raw, qtype, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    want = x.double() @ w.double().T
    got = native.matmul(x, raw, qtype, n, k)
    assert got.shape == (m, n)
    # activations quantized to 8 bits: the error per product is ~|x||w|/127/sqrt(k)-ish
    tol = 1e-4 if qtype in (T.F32, T.F16, T.BF16) else 2e-2
    err = (got.double() - want).norm() / want.norm()
    assert err < tol, f"{qtype.name}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_matmul_batch_invariant_bitwise(qtype):
    n, k = 67, 512
    raw = random_weight(qtype, n, k, seed=3)
    x = torch.randn(33, k, generator=torch.Generator().manual_seed(4))
    try:
        for threads in (1, 2, 3):
            native.set_num_threads(threads)
            single = torch.cat([native.matmul(x[i:i + 1], raw, qtype, n, k) for i in range(x.shape[0])])
            for m in (1, 2, 7, 33):
                assert torch.equal(native.matmul(x[:m], raw, qtype, n, k), single[:m]), (threads, m)
            # a column slice of a wider output: the row stride is honoured
            wide = torch.zeros(x.shape[0], n + 5)
            native.matmul(x, raw, qtype, n, k, out=wide[:, 2:2 + n])
            assert torch.equal(wide[:, 2:2 + n], single) and not wide[:, :2].any() and not wide[:, 2 + n:].any()
    finally:
        native.set_num_threads(native.default_num_threads())


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_tiled_product_equals_single_rows_bitwise(qtype):
    """A prefill-sized product (row blocks of 64, 4-row tiles, an odd tail of rows and of weight rows) gives
    every row exactly what that row gets alone, and stays close to the dequantized product."""
    n, k, m = 37, 512, 131
    raw = random_weight(qtype, n, k, seed=6)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    try:
        native.set_num_threads(1)
        single = torch.cat([native.matmul(x[i:i + 1], raw, qtype, n, k) for i in range(m)])
        for threads in (1, 2):
            native.set_num_threads(threads)
            assert torch.equal(native.matmul(x, raw, qtype, n, k), single), threads
            assert torch.equal(native.matmul(x[:5], raw[:35], qtype, 35, k), single[:5, :35]), threads
    finally:
        native.set_num_threads(native.default_num_threads())
    want = x.double() @ reference(raw, qtype, n, k).double().T
    tol = 1e-4 if qtype in (T.F32, T.F16, T.BF16) else 2e-2
    assert (single.double() - want).norm() / want.norm() < tol


def test_unsupported_type_is_named():
    for qtype in (T.Q2_K, T.IQ4_NL):
        with pytest.raises(ValueError, match=qtype.name):
            native.row_bytes(qtype, 256)
        with pytest.raises(ValueError, match=qtype.name):
            native.matmul(torch.zeros(1, 256), torch.zeros(1, 84, dtype=torch.uint8), qtype, 1, 256)
    assert native.supported_types() == frozenset(int(t) for t in ALL)


def test_real_model_tensors_dequantize_exactly():
    """Tensors of the embedded SmolLM2 file (Q4_1 projections, the Q8_0 embedding) as users' files hold them."""
    from servelm.engine.models.loader import default_model_path

    reader = gguf.GGUFReader(default_model_path())
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen or t.tensor_type not in (T.Q4_1, T.Q8_0):
            continue
        seen.add(t.tensor_type)
        k = int(t.shape[0])
        raw = torch.from_numpy(np.array(t.data[:64]).view(np.uint8)).reshape(64, -1)
        ref = reference(raw, t.tensor_type, 64, k)
        assert torch.equal(native.dequantize(raw, t.tensor_type, 64, k), ref), t.name
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(5))
        err = (native.matmul(x, raw, t.tensor_type, 64, k) - x @ ref.T).norm() / (x @ ref.T).norm()
        assert err < 2e-2, t.name
    assert seen == {T.Q4_1, T.Q8_0}
