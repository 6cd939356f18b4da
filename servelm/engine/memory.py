"""Size the KV pool from free memory: on the CPU a fraction of what the machine has available; on CUDA
from what a profiling pass leaves free (vLLM's ``gpu_memory_utilization``).

The pass runs the largest step the scheduler can hand the model (``max_num_batched_tokens``
prompt tokens, logits for ``max_num_seqs`` rows) and records the peak memory PyTorch
allocated. The pool gets ``total * utilization`` minus that peak, minus memory held outside
PyTorch's allocator (CUDA context, cuBLAS workspaces, other processes), minus a reserve for
the captured CUDA graphs.
"""
from __future__ import annotations

import logging

import torch

from servelm.engine.attention import BatchLayout, get_backend

log = logging.getLogger("servelm.engine")

GRAPH_RESERVE_BYTES = 512 << 20  # CUDA graph pools and the decode scratch they keep alive
# Share of the host's available memory (after the weights are loaded) the CPU KV pool may take: the rest
# is left to activations, the tokenizer, the server and whatever else runs on the machine.
CPU_KV_FRACTION = 0.25


def available_memory() -> int:
    """Bytes the host can still give this process without swapping (``MemAvailable``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes."""
    import resource
    import sys

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024


def cpu_kv_budget(bytes_per_block: int, block_size: int, max_model_len: int, max_num_seqs: int) -> int:
    """Bytes of the CPU KV pool: what ``max_num_seqs`` sequences of ``max_model_len`` tokens can use, at most
    ``CPU_KV_FRACTION`` of the memory available now. Raises ValueError when that is not one block."""
    need = max_num_seqs * -(-max_model_len // block_size) * bytes_per_block
    avail = available_memory()
    budget = min(need, int(avail * CPU_KV_FRACTION))
    if budget < bytes_per_block:
        raise ValueError(f"no memory is left for the KV cache: {avail / 2**30:.2f} GiB available, one "
                         f"{block_size}-token block needs {bytes_per_block / 2**20:.1f} MiB; free memory or pass "
                         f"a smaller --max-model-len")
    return budget


def check_fits(need_bytes: int, what: str) -> None:
    """Raises ModelLoadError, before anything is allocated, when ``need_bytes`` exceed the available memory."""
    from servelm.engine.models.config import ModelLoadError

    avail = available_memory()
    if need_bytes > avail:
        raise ModelLoadError(f"{what} needs {need_bytes / 2**30:.2f} GiB of memory, and this machine has "
                             f"{avail / 2**30:.2f} GiB available; free memory, or use a smaller or more "
                             f"quantized model")


def profile_layout(lens: list[int], block_size: int, dev: torch.device) -> tuple[BatchLayout, torch.Tensor, int]:
    """A batch of fresh prompts of ``lens`` tokens over private blocks: (layout, positions, blocks needed)."""
    per_seq = -(-max(lens) // block_size)
    blocks = per_seq * len(lens)
    tables = torch.arange(blocks, dtype=torch.int32, device=dev).view(len(lens), per_seq)
    slots = torch.cat([tables[i].long().repeat_interleave(block_size)[:n] * block_size
                       + torch.arange(n, device=dev) % block_size for i, n in enumerate(lens)])
    positions = torch.cat([torch.arange(n, device=dev) for n in lens])
    prefills = len(lens) - (1 if len(lens) > 1 and lens[-1] == 1 else 0)  # a 1-token tail is a decode, packed last
    layout = BatchLayout(slot_mapping=slots, query_lens=lens, context_lens=lens, block_tables=tables,
                         num_prefills=prefills, num_prefill_tokens=sum(lens[:prefills]),
                         context_lens_tensor=torch.tensor(lens, dtype=torch.int32, device=dev))
    return layout, positions, blocks


@torch.inference_mode()
def profile_kv_budget(engine, utilization: float) -> int:
    """Bytes the KV pool may take on the engine's GPU; raises ValueError when none are left.

    ``engine`` needs ``model``, ``config``, ``device``, ``dtype`` and ``max_model_len`` set.
    """
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    dev = engine.device
    cfg, model = engine.config, engine.model
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    free, total = torch.cuda.mem_get_info(dev)
    outside_torch = (total - free) - torch.cuda.memory_reserved(dev)

    # The largest step: max_num_batched_tokens prompt tokens, as sequences no longer than the context window.
    tokens = max(1, cfg.max_num_batched_tokens)
    lens = [min(engine.max_model_len, tokens - i) for i in range(0, tokens, engine.max_model_len)]
    mc = model.config
    backend = get_backend(cfg.attention_backend, dev, engine.dtype, mc.head_dim)
    layout, positions, blocks = profile_layout(lens, cfg.block_size, dev)
    caches = backend.allocate_kv_cache(mc.num_layers, blocks, cfg.block_size, mc.num_kv_heads, mc.head_dim,
                                       engine.dtype, dev)
    ctx = backend.make_context(layout, caches, mc.head_dim ** -0.5)
    ids = torch.randint(0, mc.vocab_size, (tokens,), device=dev)
    hidden = model(ids, positions, ctx)
    rows = min(cfg.max_num_seqs, tokens)
    logits = model.compute_logits(hidden[-rows:])
    torch.softmax(logits, -1).argmax(-1)  # the sampler's float copies of the logits
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    cache_bytes = sum(c.numel() * c.element_size() for c in caches)
    del caches, ctx, hidden, logits
    torch.cuda.empty_cache()
    budget = int(total * utilization - (peak - cache_bytes) - outside_torch - GRAPH_RESERVE_BYTES)
    log.info("memory profile: total %.1f GiB, weights+activations peak %.2f GiB, outside torch %.2f GiB, "
             "KV budget %.2f GiB at utilization %.2f", total / 2**30, (peak - cache_bytes) / 2**30,
             outside_torch / 2**30, budget / 2**30, utilization)
    if budget <= 0:
        raise ValueError(f"no GPU memory is left for the KV cache at gpu_memory_utilization={utilization}: the "
                         f"weights and a {tokens}-token step peak at {(peak - cache_bytes) / 2**30:.1f} GiB of "
                         f"{total / 2**30:.1f} GiB; raise gpu_memory_utilization or lower max_num_batched_tokens")
    return budget
