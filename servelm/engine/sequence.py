"""One sequence of tokens the engine is generating: the prompt plus what it has produced so far."""
from __future__ import annotations

import itertools
from enum import Enum

import torch

from servelm.engine.outputs import TokenLogprobs
from servelm.engine.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request with ``n`` completions owns ``n`` sequences that start from the same prompt.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; the scheduler hands
    out the rest in chunks. ``block_table`` lists this sequence's KV blocks in order.
    """

    __slots__ = ("seq_id", "request_id", "index", "token_ids", "num_prompt_tokens", "num_computed_tokens",
                 "num_cached_prompt_tokens", "block_table", "block_hashes", "params", "status", "generator",
                 "wait_for", "output_text", "emitted_text_len", "emitted_token_count", "prefix_offset",
                 "read_offset", "finish_reason", "stop_reason", "logprobs", "prompt_logprobs", "cumulative_logprob",
                 "arrival_time", "first_scheduled_time", "first_token_time", "last_token_time", "max_tokens",
                 "grammar", "pending_tokens", "spec_token_ids")

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, max_tokens: int):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        # Async scheduling: 1 while a token sampled on the device has not reached ``token_ids`` yet (the
        # next step already computes it, reading it on the device); 0 otherwise.
        self.pending_tokens = 0
        # Speculative decoding: tokens a proposer guessed follow ``token_ids``, verified in this step's
        # forward pass (their K/V are written past the computed tokens; the rejected ones' slots are reused)
        self.spec_token_ids: list[int] = []
        self.num_cached_prompt_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.params = params
        self.max_tokens = max_tokens
        self.status = SequenceStatus.WAITING
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            # Each completion gets its own stream so n > 1 with a seed gives n different samples,
            # and the stream never depends on which other requests share the batch.
            self.generator = torch.Generator().manual_seed((params.seed * 1_000_003 + index) % (1 << 63))
        self.grammar = None  # an xgrammar GrammarMatcher when params.structured_output is set (the engine's)
        self.wait_for: Sequence | None = None  # sibling whose prompt must be cached first (n > 1)
        self.output_text = ""
        self.emitted_text_len = 0
        self.emitted_token_count = 0
        # Incremental detokenization starts a few prompt tokens back so a leading space renders right.
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        # Position i holds the logprobs of prompt token i (None for the first, which nothing predicts).
        # Only the first of n sequences computes them, and it never reuses cached prefix blocks.
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.cumulative_logprob = 0.0
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_incl_pending(self) -> int:
        """Tokens the engine knows of, the one still on the device (async scheduling) included."""
        return len(self.token_ids) + self.pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def prompt_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
