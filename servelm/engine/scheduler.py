"""Continuous batching: every step hands each request a number of tokens to compute.

One mechanism covers prefill, chunked prefill and decode (as in vLLM v1): a running
sequence asks for the tokens it has not computed yet (1 when decoding), capped by the
step's token budget. Running sequences go first; waiting ones are admitted while the
budget, ``max_num_seqs`` and the KV pool allow. When the pool runs dry the newest
running sequence is preempted: its blocks are freed and it is recomputed later.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from servelm.engine.kv_cache import KVCacheManager
from servelm.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int | None = None  # max prompt tokens of one sequence per step (None: the budget)
    # longrope (Phi-3): the context length past which the model rotates with its long factors; a sequence
    # that decodes past it is recomputed from its first token, as transformers recomputes its cache there
    long_context_after: int | None = None


@dataclass(slots=True)
class ScheduledBatch:
    """What to compute this step: ``(sequence, number of new tokens)`` pairs."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queues and free its blocks at once (finished or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = SequenceStatus.FINISHED
        self.kv.free(seq)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        known = seq.num_tokens_incl_pending - seq.num_computed_tokens
        n = min(known, budget)
        if self.config.prefill_chunk_size and n > 1:
            n = min(n, self.config.prefill_chunk_size)
        if known == 1 and seq.spec_token_ids:  # a decode verifying proposals: as many as the budget holds
            n = min(1 + len(seq.spec_token_ids), budget)
            del seq.spec_token_ids[n - 1:]
        return n

    def _recompute_past_long_context(self, seq: Sequence) -> None:
        after = self.config.long_context_after
        # the decode step whose context first exceeds ``after``: the cached K/V were rotated with the short
        # factors, so the whole sequence is computed again (its blocks freed, re-allocated below)
        if (after is not None and seq.num_computed_tokens == after and seq.num_output_tokens > 0
                and seq.num_tokens_incl_pending == after + 1):
            seq.spec_token_ids = []
            self.kv.free(seq)
            seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.spec_token_ids = []
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work. Never raises for lack of memory: it preempts instead."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            self._recompute_past_long_context(seq)
            n = self._chunk(seq, budget)
            while not self.kv.allocate(seq, n):
                if seq.spec_token_ids:  # drop the proposals before preempting anyone for them
                    seq.spec_token_ids = []
                    n = self._chunk(seq, budget)
                    continue
                victim = self.running[-1]  # newest first
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            else:
                batch.items.append((seq, n))
                scheduled.add(seq.seq_id)
                budget -= n
                i += 1
        if batch.num_preempted:
            return batch  # the pool is full: admitting more would only thrash
        now = time.monotonic()
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            sib = seq.wait_for
            if sib is not None and not (sib.prompt_done or sib.finished):
                skipped.append(seq)  # share the sibling's prompt blocks once they are cached
                continue
            seq.wait_for = None
            cached = self.kv.find_cached_prefix(seq)
            num_cached = len(cached) * self.kv.block_size
            seq.num_computed_tokens = num_cached
            n = self._chunk(seq, budget)
            seq.num_computed_tokens = 0
            if not self.kv.allocate(seq, n, cached):
                skipped.append(seq)
                break
            seq.num_computed_tokens = num_cached
            if seq.num_output_tokens == 0:  # first admission, not a recompute after preemption
                seq.num_cached_prompt_tokens = num_cached
                self.kv.record_prefix_lookup(seq.num_prompt_tokens, num_cached)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            self.running.append(seq)
            batch.items.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return batch
