"""CUDA graphs for decode steps: the whole forward pass and LM head replayed as one launch.

Steps made of decodes and short prefills (each prefill token a decode row, see
``attention.base.SHORT_PREFILL``) replay them too: the new tokens behind a prefix-cache hit cost
one graph replay instead of ~400 eager launches.

Graphs are captured once at a ladder of batch sizes (1, 2, 4, 8, then every 16 up to
``max_num_seqs``); a decode batch is padded to the next captured size. Their attention splits the
context as for the longest one allowed. (Extra one-split graphs for short contexts, one kernel
fewer per layer, replayed 0.11 ms slower for the 8B shape on an H200, so there are none.)
Inputs live in persistent device buffers that each step overwrites with host-to-device copies of
pinned staging tensors; padding rows write no K/V (slot -1) and attend to one token. The only
host synchronisation per step is reading the sampled token ids, which async scheduling
(``LLMEngine.step``) defers until the next step is launched.
"""
from __future__ import annotations

import logging

import torch

from servelm.engine.attention import BatchLayout
from servelm.engine.attention.base import SHORT_PREFILL
from servelm.engine.attention.triton_backend import TritonAttentionBackend
from servelm.engine.attention.triton_kernels import pick_num_splits
from servelm.engine.sequence import Sequence
from servelm.engine.warmup import CAPTURES

log = logging.getLogger("servelm.engine")


def batch_ladder(max_num_seqs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, 16, 32, 48, ... up to and including ``max_num_seqs``."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class CUDAGraphRunner:
    """Captured decode steps for one :class:`ModelRunner`; ``run`` returns logits or None (run eagerly)."""

    def __init__(self, runner, max_num_seqs: int, max_model_len: int):
        """Capture every size of the ladder. Raises ValueError unless the runner uses the Triton backend."""
        if not isinstance(runner.backend, TritonAttentionBackend):
            raise ValueError("CUDA graphs need the Triton attention backend (attention_backend='auto' or 'triton')")
        self.runner = runner
        self.sizes = batch_ladder(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_blocks = -(-max_model_len // runner.block_size)
        dev = runner.device
        # Rows of the staging tensor: token id, position, slot, context length. Two sets, used in turn:
        # under async scheduling step k+1 is staged before step k's copies have surely run, but
        # after step k-1 finished (its sampled ids were read).
        self._buffers = []
        for _ in range(2):
            st = torch.zeros(4, self.max_bs, dtype=torch.int64).pin_memory()
            tab = torch.zeros(self.max_bs, self.max_blocks, dtype=torch.int32).pin_memory()
            self._buffers.append((st, tab, st.numpy(), tab.numpy()))
        self._flip()
        self.meta = torch.zeros(4, self.max_bs, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(self.max_bs, self.max_blocks, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_splits = pick_num_splits(max_model_len)
        self._capture_all()

    def _flip(self) -> None:
        self._buffers.reverse()
        self.staging, self.table_staging, self.staging_np, self.table_staging_np = self._buffers[0]

    def _forward(self, bs: int) -> torch.Tensor:
        lay = BatchLayout(slot_mapping=self.meta[2, :bs], query_lens=[1] * bs, context_lens=[1] * bs,
                          block_tables=self.tables[:bs], num_prefills=0, num_prefill_tokens=0,
                          context_lens_tensor=self.meta[3, :bs].to(torch.int32))
        r = self.runner
        ctx = r.backend.make_context(lay, r.kv_caches, r.scale, num_splits=self.num_splits)
        hidden = r.model(self.meta[0, :bs], self.meta[1, :bs], ctx)
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self.meta[2].fill_(-1)  # capture-time runs must not write into the cache
        self.meta[3].fill_(1)
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside the capture
                self._forward(bs)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = g.pool()
            self.graphs[bs] = g
            CAPTURES[0] += 1  # servelm.engine.warmup.compile_counts reads it
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def run(self, items: list[tuple[Sequence, int]], prev=None) -> tuple[torch.Tensor, list[Sequence]] | None:
        """(logits of the sampling rows, their sequences) for a step that fits a captured size; else None.

        Every scheduled token is one row: a decode is one row, a short prefill (see
        ``attention.base.SHORT_PREFILL``; e.g. the new tokens behind a prefix-cache hit) one row per token.
        Pending tokens (async scheduling) are copied on the device from ``prev``, the step in flight.
        """
        rows = sum(n for _, n in items)
        if rows > self.max_bs or any(n > SHORT_PREFILL for _, n in items):
            return None
        bs = next(s for s in self.sizes if s >= rows)
        block_size = self.runner.block_size
        self._flip()
        st, tab = self.staging_np, self.table_staging_np
        i = widest = 0
        sample_rows, samplers = [], []
        pending_rows, pending_src = [], []
        for seq, n in items:
            start = seq.num_computed_tokens
            table = seq.block_table
            ids = seq.token_ids[start:start + n]
            if len(ids) < n:  # the last one was sampled by the step in flight
                prev.pending_input(seq, i + len(ids), pending_rows, pending_src)
                ids = ids + [0]
            for pos in range(start, start + n):
                st[0, i] = ids[pos - start]
                st[1, i] = pos
                st[2, i] = table[pos // block_size] * block_size + pos % block_size
                st[3, i] = pos + 1
                tab[i, :len(table)] = table
                i += 1
            widest = max(widest, len(table))
            if start + n == seq.num_tokens_incl_pending:
                sample_rows.append(i - 1)
                samplers.append(seq)
        st[:2, rows:bs] = 0
        st[2, rows:bs] = -1  # padding rows: no K/V write, attend to one (stale) token
        st[3, rows:bs] = 1
        self.meta[:, :bs].copy_(self.staging[:, :bs], non_blocking=True)
        self.tables[:rows, :widest].copy_(self.table_staging[:rows, :widest], non_blocking=True)
        if pending_rows:
            prev.fill(self.meta[0], pending_rows, pending_src)
        self.graphs[bs].replay()
        logits = self.logits[bs]
        if len(sample_rows) == rows:  # all decodes: the rows are 0..rows-1
            return logits[:rows], samplers
        return logits[torch.tensor(sample_rows, device=logits.device)], samplers
