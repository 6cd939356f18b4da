"""Warm-up before ready: every kernel shape live traffic will use is compiled, captured and measured at start.

On CUDA a freshly started engine would otherwise pay, under its first requests, for what only the first
call of a shape does: a Triton kernel compiled per specialization (a prefill's block size, a decode step's
number of context splits, ...), a quantized layer timing its candidate kernels per batch bucket
(``quant.kernels``), cuBLAS picking algorithms per matrix shape, the sampler's top-k/top-p, penalty and
logprob paths loading their kernels. Each costs from milliseconds to half a second, and together they
gave a fresh server at 16 req/s token gaps of ~0.5 s for its first ~80 requests.

:func:`warm_up` runs a small workload straight through the :class:`~servelm.engine.llm_engine.LLMEngine`
before it serves (``AsyncEngine.start``, so before the server's ``/ready`` turns 200): prefills of every
power-of-two length up to the step's token budget, steps that mix a prefill with decodes at every
context-split bucket the served context reaches, and one request per sampler path. Its requests never
reach a server's queue, metrics, review queue or logs, and the engine's step counters and prefix cache
are reset afterwards. On the CPU it does nothing (no kernel there is compiled or captured per shape).
``SERVELM_WARMUP=0`` skips it, for benchmarks of a cold start only (``bench/serve_sweep.py --cold``).

:func:`compile_counts` reports how many Triton compilations, CUDA-graph captures and quantized kernel
measurements the process has done so far; the GPU test compares it before and after live requests.
"""
from __future__ import annotations

import itertools
import logging
import os
import time

import torch

from servelm.engine.sampling_params import InvalidRequestError, SamplingParams, StructuredOutputParams

log = logging.getLogger("servelm.engine")

_TRITON_COMPILES = [0]
SPLIT_TOKENS = 64  # attention.triton_kernels.SPLIT_TOKENS (not imported: it needs Triton)
CAPTURES = [0]  # CUDA graphs captured by this process (counted in cuda_graph.py)
_HOOKED = [False]


def _count_triton_compiles() -> bool:
    """Installs a Triton cache hook counting compilations (in-memory cache misses); False without Triton."""
    if _HOOKED[0]:
        return True
    try:
        import triton  # noqa: PLC0415 (CUDA only)
    except ImportError:
        return False

    def install(get, put) -> None:
        previous = get()

        def hook(*args, **kwargs):
            _TRITON_COMPILES[0] += 1
            # a truthy answer would tell Triton to skip the compilation: pass on the previous hook's
            return previous(*args, **kwargs) if previous is not None else None

        put(hook)

    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4
    if knobs is not None and hasattr(knobs, "runtime") and hasattr(knobs.runtime, "jit_cache_hook"):
        install(lambda: knobs.runtime.jit_cache_hook, lambda h: setattr(knobs.runtime, "jit_cache_hook", h))
    else:
        from triton.runtime.jit import JITFunction  # noqa: PLC0415

        if not hasattr(JITFunction, "cache_hook"):
            return False
        install(lambda: JITFunction.cache_hook, lambda h: setattr(JITFunction, "cache_hook", h))
    _HOOKED[0] = True
    return True


def compile_counts() -> dict[str, int | None]:
    """Returns ``{"triton_compilations", "cuda_graph_captures", "quant_kernel_measurements"}`` for this
    process so far (``triton_compilations`` is None where Triton is not installed)."""
    from servelm.engine.quant import kernels  # noqa: PLC0415

    return {"triton_compilations": _TRITON_COMPILES[0] if _count_triton_compiles() else None,
            "cuda_graph_captures": CAPTURES[0],
            "quant_kernel_measurements": len(kernels.chosen())}


def split_buckets(max_model_len: int) -> list[int]:
    """Returns the context-split counts an eager decode step can take (see ``attention.triton_backend``)."""
    try:
        from servelm.engine.attention.triton_backend import eager_num_splits  # noqa: PLC0415
        from servelm.engine.attention.triton_kernels import SPLIT_TOKENS  # noqa: PLC0415
    except ImportError:  # no Triton: attention has no split grid
        return [1]
    return sorted({eager_num_splits(n) for n in range(1, max_model_len + 1, SPLIT_TOKENS)})


# One request per sampler path: the sampler picks kernels by what a batch asks for.
SAMPLER_PATHS = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, seed=0),
    SamplingParams(temperature=0.8, top_k=20, seed=0),
    SamplingParams(temperature=0.8, top_p=0.9, seed=0),
    SamplingParams(temperature=0.8, min_p=0.05, seed=0),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.01, seed=0),
    SamplingParams(temperature=0.0, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
    SamplingParams(temperature=0.0, logprobs=5),
    SamplingParams(temperature=0.0, logprobs=0),
    SamplingParams(temperature=0.0, prompt_logprobs=1),
    SamplingParams(temperature=0.0, logit_bias={1: -1.0}),
    SamplingParams(temperature=0.8, n=2, seed=0),
)


def warm_up(engine) -> dict:
    """Runs the warm-up workload on ``engine`` (an idle :class:`LLMEngine`) where it runs on CUDA.

    Returns ``{"seconds", "requests", "before": compile_counts(), "after": compile_counts()}``, or
    ``{"skipped": reason}`` on the CPU. Raises what a step raises (a broken model fails the start, not
    the first request)."""
    if engine.device.type != "cuda":
        return {"skipped": "cpu"}
    if os.environ.get("SERVELM_WARMUP", "1") == "0":  # benchmarks of a cold start only
        return {"skipped": "SERVELM_WARMUP=0"}
    if engine.has_unfinished_requests():
        return {"skipped": "engine busy"}
    return run_workload(engine)


def run_workload(engine) -> dict:
    """Runs the warm-up workload on ``engine`` whatever its device (tests run it on the CPU); returns the
    report :func:`warm_up` does."""
    _count_triton_compiles()
    before = compile_counts()
    t0 = time.perf_counter()
    counters = (engine.steps, engine.overlapped_steps, engine.prompt_tokens_computed)
    ids = itertools.count()
    vocab = engine.model_config.vocab_size
    rng = torch.Generator().manual_seed(1234)

    def prompt(n: int) -> list[int]:  # random ids: no user prompt shares their prefix blocks
        return torch.randint(3, max(4, vocab - 1), (max(1, n),), generator=rng).tolist()

    def add(n: int, params: SamplingParams, max_tokens: int) -> str:
        rid = f"servelm-warmup-{next(ids)}"
        engine.add_request(rid, prompt(n), _with(params, max_tokens))
        return rid

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    limit = engine.max_model_len - 8
    budget = min(engine.config.max_num_batched_tokens, limit)
    # 1. prefill-only steps of every power-of-two size: prefill kernel tiles, cuBLAS shapes, quantized
    #    kernel buckets (the decode graphs measured the small ones at capture)
    n = 2
    while n <= budget:
        add(n, SamplingParams(temperature=0.0), 2)
        drain()
        n *= 2
    # 2. steps mixing prefills with decodes, at every split bucket of the decodes' longest context
    for splits in split_buckets(engine.max_model_len):
        ctx = min(limit - 16, max(2, (splits - 1) * SPLIT_TOKENS + SPLIT_TOKENS // 2))
        add(ctx, SamplingParams(temperature=0.0), 12)
        while not _decoding(engine):  # its prompt is in (in chunks when longer than a step)
            engine.step()
        for q_len in (3, 24, 80):  # short (decode rows), small-tile and large-tile prefills beside it
            add(q_len, SamplingParams(temperature=0.0), 2)
            engine.step()  # under async scheduling the first call only drains the step in flight
            engine.step()
        drain()
    # 3. each sampler path alone, then all at once (a batch of mixed requests takes the general path)
    for params in SAMPLER_PATHS:
        add(16, params, 3)
        drain()
    for params in SAMPLER_PATHS:
        add(16, params, 3)
    drain()
    # 4. constrained decoding: xgrammar's import and its bitmask kernels (each schema still compiles on
    #    its first request: that is the grammar's own cost, cached by spec afterwards)
    try:
        add(16, SamplingParams(temperature=0.0, structured_output=StructuredOutputParams(json_object=True)), 3)
        drain()
    except (ImportError, InvalidRequestError) as e:  # xgrammar missing: constrained requests fail on their own
        log.warning("warm-up: constrained decoding not warmed (%s)", e)
    engine.steps, engine.overlapped_steps, engine.prompt_tokens_computed = counters
    engine.kv.reset_prefix_cache()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    report = {"seconds": round(time.perf_counter() - t0, 2), "requests": next(ids), "before": before,
              "after": compile_counts()}
    log.info("warm-up before ready: %d requests in %.1f s (%s)", report["requests"], report["seconds"],
             report["after"])
    return report


def _with(params: SamplingParams, max_tokens: int) -> SamplingParams:
    """``params`` with ``max_tokens`` and ``ignore_eos`` set (the warm-up's lengths are fixed)."""
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(params, max_tokens=max_tokens, ignore_eos=True)


def _decoding(engine) -> bool:
    """True once every running sequence has its prompt computed (its next steps are decodes)."""
    running = list(engine.scheduler.running)
    return bool(running) and all(s.num_computed_tokens >= s.num_prompt_tokens for s in running)
