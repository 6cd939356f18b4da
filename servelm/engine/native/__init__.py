"""Native CPU kernels for GGUF blocks: matrix products and dequantization on the blocks as stored.

The kernels live in a small C++ library with a C ABI (``kernels.cpp``), built by
``python3 -m servelm.engine.native.build`` (``scripts/install.sh`` runs it) or, if missing, on first use.
The AVX2/FMA/F16C variant is loaded where the CPU has those features, else the portable one.

Weights are ``uint8`` tensors holding GGUF blocks exactly as the file stores them, one row per output
feature. Products quantize each activation row to 8-bit blocks once, as llama.cpp does, and row ``i`` of a
product depends only on ``x[i]`` and the weight, bitwise, whatever the batch size or thread count.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

# gguf.GGMLQuantizationType values the kernels run
_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
               12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
_SUPPORTED = frozenset(_TYPE_NAMES)

_lib = None
_lib_error: str | None = None
_lock = threading.Lock()
_threads_set = False


def cpu_variant() -> str:
    """``"avx2"`` where the CPU has AVX2, FMA and F16C, else ``"portable"``; ``SERVELM_NATIVE_VARIANT``
    overrides the choice (to test the portable build on an AVX2 machine)."""
    forced = os.environ.get("SERVELM_NATIVE_VARIANT")
    if forced in ("avx2", "portable"):
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable"
    except OSError:
        pass
    return "portable"


def default_num_threads() -> int:
    """The cores this process may run on (its CPU affinity), or ``SERVELM_NATIVE_THREADS`` if set."""
    env = os.environ.get("SERVELM_NATIVE_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _load():
    global _lib, _lib_error, _threads_set
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        from servelm.engine.native import build

        variant = cpu_variant()
        try:
            path = build.library_path(variant)
            if not path.exists():
                log.info("native CPU kernels (%s) not built yet: building them now (once)", variant)
                path = build.build(variant)
            lib = ctypes.CDLL(str(path))
        except (build.NativeBuildError, OSError) as exc:
            _lib_error = str(exc)
            log.warning("native CPU kernels unavailable: %s", exc)
            return None
        i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.slk_row_bytes.restype = i64
        lib.slk_row_bytes.argtypes = [ci, i64]
        lib.slk_supported.argtypes = [ci]
        lib.slk_set_num_threads.argtypes = [ci]
        lib.slk_dequantize.argtypes = [vp, ci, i64, i64, vp, i64, vp]
        lib.slk_matmul.argtypes = [vp, i64, vp, ci, i64, i64, vp, i64]
        if not _threads_set:
            lib.slk_set_num_threads(default_num_threads())
            _threads_set = True
        _lib = lib
        return lib


def library():
    """The loaded ctypes library; raises RuntimeError if it cannot be built or loaded."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"servelm's native CPU kernels are unavailable: {_lib_error}")
    return lib


def available() -> bool:
    """True if the compiled library is built (or can be) and loads on this CPU."""
    return _load() is not None


def supported_types() -> frozenset[int]:
    """The gguf.GGMLQuantizationType values the kernels run."""
    return _SUPPORTED


def type_name(qtype: int) -> str:
    """The GGML name of ``qtype`` (``"Q4_K"``), or ``"type <n>"`` for a value gguf does not know."""
    try:
        import gguf

        return gguf.GGMLQuantizationType(qtype).name
    except (ImportError, ValueError):
        return _TYPE_NAMES.get(qtype, f"type {qtype}")


def _check_type(qtype: int) -> None:
    if int(qtype) not in _SUPPORTED:
        raise ValueError(f"GGUF tensor type {type_name(qtype)} is not supported by servelm's CPU kernels "
                         f"(supported: {', '.join(sorted(_TYPE_NAMES.values()))})")


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of ``k`` inputs. Raises ValueError for an unsupported type or a ``k`` that is not a
    multiple of the type's block size."""
    _check_type(qtype)
    rb = library().slk_row_bytes(int(qtype), int(k))
    if rb < 0:
        raise ValueError(f"a row of {k} inputs is not a whole number of {type_name(qtype)} blocks")
    return rb


def _check_blocks(blocks: torch.Tensor, qtype: int, n: int, k: int) -> None:
    rb = row_bytes(qtype, k)
    if blocks.dtype != torch.uint8 or blocks.device.type != "cpu" or not blocks.is_contiguous():
        raise ValueError("blocks must be a contiguous uint8 CPU tensor")
    if blocks.numel() != n * rb:
        raise ValueError(f"blocks hold {blocks.numel()} bytes, expected {n} rows x {rb} bytes "
                         f"of {type_name(qtype)} for {k} inputs")


def set_num_threads(n: int) -> None:
    """Sets the number of threads the kernels run on (the calling thread included)."""
    global _threads_set
    library().slk_set_num_threads(max(1, int(n)))
    _threads_set = True


def matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: int, n: int, k: int,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Returns float32 ``[M, n] = x @ dequantize(blocks).T`` for float32 ``x`` of shape ``[M, k]``.

    ``out`` may be a float32 ``[M, n]`` tensor whose rows are contiguous (a column slice of a wider
    tensor is fine: its row stride is honoured). Raises ValueError for an unsupported type or
    mismatched shapes.
    """
    _check_blocks(blocks, qtype, n, k)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be float32 [M, {k}], got {x.dtype} {list(x.shape)}")
    x = x.contiguous()
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    elif out.dtype != torch.float32 or tuple(out.shape) != (m, n) or (n > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be float32 [{m}, {n}] with contiguous rows")
    if m == 0 or n == 0:
        return out
    rc = library().slk_matmul(x.data_ptr(), m, blocks.data_ptr(), int(qtype), n, k, out.data_ptr(),
                              out.stride(0))
    if rc != 0:
        raise ValueError(f"native matmul rejected {type_name(qtype)} with k={k}")
    return out


def dequantize(blocks: torch.Tensor, qtype: int, n: int, k: int, rows=None) -> torch.Tensor:
    """Returns float32 ``[len(rows) or n, k]``: the rows' weights, equal to ``gguf.quants.dequantize``.

    ``rows`` (a sequence or int64 tensor of row indices) selects rows, as an embedding lookup does.
    Raises ValueError for an unsupported type, mismatched shapes or a row index out of range.
    """
    _check_blocks(blocks, qtype, n, k)
    lib = library()
    if rows is None:
        out = torch.empty(n, k, dtype=torch.float32)
        if n:
            lib.slk_dequantize(blocks.data_ptr(), int(qtype), n, k, None, 0, out.data_ptr())
        return out
    idx = torch.as_tensor(rows, dtype=torch.int64).reshape(-1).contiguous()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"row index out of range for {n} rows")
    out = torch.empty(idx.numel(), k, dtype=torch.float32)
    if idx.numel():
        lib.slk_dequantize(blocks.data_ptr(), int(qtype), n, k, idx.data_ptr(), idx.numel(), out.data_ptr())
    return out
