"""The paged KV cache's bookkeeping: a pool of fixed-size blocks with hashed prefix reuse.

Blocks hold ``block_size`` tokens of K/V for every layer. A sequence's ``block_table``
lists its blocks in order. A full block is named by a hash chain over its tokens and
its predecessors', so two requests with the same prefix map to the same blocks.
Free blocks keep their contents and stay findable by hash until they are reused,
least recently freed first (LRU).

With a sliding window in every layer (Mistral's ``sliding_window``), a sequence's blocks that fell wholly out
of the window are released as it advances: its later queries never read them. Their block-table entries
stay (positions still index the table) and point at block 0 as a placeholder, which the attention masks out.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from servelm.engine.sequence import Sequence


@dataclass(slots=True)
class KVCacheStats:
    num_blocks: int
    used: int  # referenced by at least one sequence
    cached: int  # free, but holding a reusable prefix
    free: int  # free and empty (includes cached)
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of which found cached

    @property
    def usage(self) -> float:
        return self.used / self.num_blocks if self.num_blocks else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class KVCacheManager:
    """Hands out blocks to sequences; never touches tensors (the runner owns those)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None):
        self.num_blocks = num_blocks
        self.window = window  # the window of every layer, or None where any layer sees the whole context
        self.released: dict[int, int] = {}  # seq_id -> leading block-table entries released (placeholders)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[tuple | None] = [None] * num_blocks  # key in `cached` while the block holds one
        self.cached: dict[tuple, int] = {}  # (parent hash, tokens) -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def stats(self) -> KVCacheStats:
        free = len(self.free_queue)
        cached = sum(1 for b in self.free_queue if self.block_hash[b] is not None)
        return KVCacheStats(self.num_blocks, self.num_blocks - free, cached, free,
                            self.prefix_queries, self.prefix_hits)

    def _block_key(self, seq: Sequence, i: int) -> tuple:
        parent = hash(seq.block_hashes[i - 1]) if i > 0 else 0
        bs = self.block_size
        return (parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))

    def _hashes_upto(self, seq: Sequence, num_full_blocks: int) -> None:
        while len(seq.block_hashes) < num_full_blocks:
            seq.block_hashes.append(self._block_key(seq, len(seq.block_hashes)))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding this sequence's leading full blocks.

        At least one token is always left to compute, because its logits are needed.
        """
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return []  # prompt logprobs need the logits at every prompt position: compute them all
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._hashes_upto(seq, max_blocks)
        hits = []
        for key in seq.block_hashes[:max_blocks]:
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """Count one admitted prompt for the hit-rate metric (retries after a full pool are not counted)."""
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += min(num_cached_tokens, num_prompt_tokens)

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give ``seq`` room for ``num_new_tokens`` more tokens after its computed ones.

        ``cached_blocks`` (from :meth:`find_cached_prefix`) are shared, not copied. Returns
        False, changing nothing, when the pool cannot supply the blocks.
        """
        have = len(seq.block_table) + len(cached_blocks)
        total = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        need = self.blocks_needed(total) - have
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if max(need, 0) + revived > len(self.free_queue):
            return False
        for b in cached_blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
            seq.block_table.append(b)
        for _ in range(need):
            seq.block_table.append(self._pop_free())
        return True

    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)  # least recently freed
        key = self.block_hash[block]
        if key is not None:  # evict its cached prefix
            if self.cached.get(key) == block:
                del self.cached[key]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def cache_full_blocks(self, seq: Sequence, prev_num_computed: int) -> None:
        """Register blocks that became full since ``prev_num_computed``, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        self._hashes_upto(seq, full)
        for i in range(prev_num_computed // self.block_size, full):
            block = seq.block_table[i]
            key = seq.block_hashes[i]
            if self.block_hash[block] is not None or key in self.cached:
                continue  # already registered, or another block holds this prefix (this one stays private)
            self.cached[key] = block
            self.block_hash[block] = key

    def release_out_of_window(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks that no later query can see: the next one, at position
        ``num_computed_tokens``, sees the ``window`` positions up to itself. A released block keeps its cached
        prefix (another request may still reuse it) until the pool hands it out again."""
        if self.window is None:
            return
        start = self.released.get(seq.seq_id, 0)
        upto = min((seq.num_computed_tokens - self.window + 1) // self.block_size, len(seq.block_table))
        for j in range(start, upto):
            self._unref(seq.block_table[j])
            seq.block_table[j] = 0
        if upto > start:
            self.released[seq.seq_id] = upto

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix and the hit-rate counts (blocks in use stay allocated)."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        self.prefix_queries = self.prefix_hits = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free ``seq``'s blocks past the first ``num_tokens`` tokens (the slots of rejected speculative
        proposals); they hold no registered prefix, since only computed full blocks are registered."""
        keep = max(self.blocks_needed(num_tokens), self.released.get(seq.seq_id, 0))
        for block in reversed(seq.block_table[keep:]):
            self._unref(block)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks; the tail goes to the free queue first so prefixes live longest."""
        for block in reversed(seq.block_table[self.released.pop(seq.seq_id, 0):]):
            self._unref(block)
        seq.block_table = []
