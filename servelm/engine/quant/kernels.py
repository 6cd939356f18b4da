"""Pick the fastest kernel for a quantized matmul by timing the candidates once.

Which kernel wins depends on device, activation dtype, layer shape and batch size (torch's
packed CPU int4 kernel wins at decode batch 1, dequantize+matmul wins for long prefills),
so each (format, device, dtype, shape, batch bucket) is measured the first time it is seen
and the winner is cached for the life of the process.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch

_CHOICES: dict[tuple, str] = {}
_LOCK = threading.Lock()
_GENERATION = [0]  # bumped by force() and reset(): modules drop the choices they remembered
# Forcing a kernel is for benchmarks and debugging only; the engine normally measures.
_FORCE = os.environ.get("SERVELM_QUANT_KERNEL") or None


def batch_bucket(m: int) -> int:
    """Returns the power-of-two bucket (1, 2, 4, ... 512) a row count falls in."""
    b = 1
    while b < m and b < 512:
        b *= 2
    return b


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forced() -> str | None:
    """Returns the kernel forced by SERVELM_QUANT_KERNEL or :func:`force` (benchmarks, tests), or None."""
    return _FORCE


def force(name: str | None) -> None:
    """Take kernel `name` wherever it is a candidate (None: measure again), from now on; forgets past
    choices. A format's storage layout is fixed when a layer is quantized ("tinygemm" keeps torch's
    CUDA int4 layout), so force before loading."""
    global _FORCE
    _FORCE = name
    reset()


def _time_cuda(fn: Callable[[], torch.Tensor], reps: int) -> float:
    """GPU seconds per call, launch gaps excluded. Decode replays CUDA graphs, where a kernel's host
    launch cost is gone, so a wall clock would favour the candidate with the cheapest launch (one
    cuBLAS call over a Triton kernel). A GPU-side sleep holds the stream while the calls are queued,
    then they run back to back between the two events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(2_000_000)  # ~1 ms: longer than queueing `reps` launches on the host
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def time_kernel(fn: Callable[[], torch.Tensor], device: torch.device, reps: int = 3) -> float:
    """Seconds one call of `fn` takes (best of `reps`; on CUDA GPU time without launch gaps)."""
    return _time(fn, device, reps)


def _time(fn: Callable[[], torch.Tensor], device: torch.device, reps: int) -> float:
    fn()  # warm-up: first calls pay for allocation and lazy init
    _sync(device)
    if device.type == "cuda":
        return min(_time_cuda(fn, 10) for _ in range(reps))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def choose(key: tuple, candidates: dict[str, Callable[[], torch.Tensor]], device: torch.device) -> str:
    """Returns the name of the fastest candidate for `key`, timing them on first sight.

    A candidate that raises (kernel missing on this build or device) is dropped. Raises
    RuntimeError only if every candidate fails."""
    name = _CHOICES.get(key)
    if name is not None:
        return name
    if _FORCE in candidates:
        return _FORCE
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:  # cannot time inside a CUDA graph capture: take the first that is listed
        return next(iter(candidates))
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]
        times, errors = {}, {}
        for cand, fn in candidates.items():
            try:
                times[cand] = _time(fn, device, reps=3)
            except (RuntimeError, NotImplementedError) as e:
                errors[cand] = e
        if not times:
            raise RuntimeError(f"no quantized kernel ran for {key}: {errors}")
        name = min(times, key=times.get)
        _CHOICES[key] = name
    return name


def chosen() -> dict[tuple, str]:
    """Returns a copy of the kernel choices made so far (for reports and benchmarks)."""
    return dict(_CHOICES)


def generation() -> int:
    """Changes whenever past choices are forgotten (:func:`reset`, :func:`force`)."""
    return _GENERATION[0]


def settled(key: tuple, name: str) -> bool:
    """True when ``name`` is the lasting answer for ``key``: measured, or forced (not the first-listed default
    :func:`choose` gives inside a CUDA-graph capture before any measurement)."""
    return _CHOICES.get(key) == name or name == _FORCE


def reset() -> None:
    """Forget all measured choices (benchmarks call this between formats)."""
    _CHOICES.clear()
    _GENERATION[0] += 1
