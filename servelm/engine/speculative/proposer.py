"""Proposers: each guesses up to ``k`` next tokens of a sequence; the engine verifies them in one step.

A proposer only proposes. Verification (``verify.py``) makes the output exactly the target model's, so a
bad guess costs compute, never quality. A draft model or an EAGLE/MTP head is another :class:`Proposer`.
"""
from __future__ import annotations

import numpy as np

from servelm.engine.sequence import Sequence
from servelm.engine.speculative.config import SpeculativeConfig


class Proposer:
    """Interface: ``propose(seqs, limits)`` returns, for each sequence, at most ``limits[i]`` token ids
    that it guesses follow ``seq.token_ids`` (an empty list: no guess this step)."""

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def release_finished(self) -> None:
        """Free whatever the proposer holds for sequences that have finished (called after each step)."""


class NgramProposer(Proposer):
    """Prompt lookup (vLLM's ``ngram``): find the sequence's last n tokens earlier in its prompt and output,
    longest n first (``prompt_lookup_max`` down to ``prompt_lookup_min``), and propose what followed the
    most recent earlier occurrence. Answers that quote their context are guessed token for token."""

    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        return [self.propose_one(s.token_ids, min(self.k, lim)) for s, lim in zip(seqs, limits)]

    def propose_one(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        if k < 1 or len(tokens) <= self.min_n:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        body = arr[:-1]  # an occurrence must be followed by at least one token
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(body, n)
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start:start + k].tolist()
        return []
