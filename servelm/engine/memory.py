"""Size the KV pool on CUDA from what a profiling pass leaves free (vLLM's ``gpu_memory_utilization``).

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

    tokens = max(1, min(cfg.max_num_batched_tokens, engine.max_model_len))
    bs = cfg.block_size
    blocks = -(-tokens // bs)
    backend = get_backend(cfg.attention_backend, dev)
    mc = model.config
    caches = backend.allocate_kv_cache(mc.num_layers, blocks, bs, mc.num_kv_heads, mc.head_dim, engine.dtype, dev)
    layout = BatchLayout(
        slot_mapping=torch.arange(tokens, device=dev),
        query_lens=[tokens], context_lens=[tokens],
        block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None, :],
        num_prefills=1, num_prefill_tokens=tokens,
        context_lens_tensor=torch.tensor([tokens], dtype=torch.int32, device=dev))
    ctx = backend.make_context(layout, caches, mc.head_dim ** -0.5)
    ids = torch.randint(0, mc.vocab_size, (tokens,), device=dev)
    hidden = model(ids, torch.arange(tokens, device=dev), ctx)
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
