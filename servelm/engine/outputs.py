"""What the engine hands back, shaped like vLLM's ``RequestOutput``."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """Log-probability of one token, with its decoded text, its raw bytes (part of a UTF-8 character for
    some tokens, where ``decoded`` is U+FFFD) and rank (1 = most likely)."""

    token_id: int
    logprob: float
    decoded: str
    rank: int | None = None
    token_bytes: bytes = b""

    @property
    def decoded_token(self) -> str:
        """vLLM's name for ``decoded``."""
        return self.decoded


@dataclass(slots=True)
class TokenLogprobs(Mapping):
    """The chosen token's logprob plus the ``k`` most likely alternatives at that position.

    Also a read-only ``{token id: Logprob}`` mapping over the chosen token and the alternatives, as vLLM
    shapes each position (``c.logprobs[i][c.token_ids[i]].logprob``); the chosen token comes first.
    """

    chosen: Logprob
    top: list[Logprob] = field(default_factory=list)

    def __getitem__(self, token_id: int) -> Logprob:
        if token_id == self.chosen.token_id:
            return self.chosen
        for lp in self.top:
            if lp.token_id == token_id:
                return lp
        raise KeyError(token_id)

    def __iter__(self) -> Iterator[int]:
        yield self.chosen.token_id
        yield from (lp.token_id for lp in self.top if lp.token_id != self.chosen.token_id)

    def __len__(self) -> int:
        return 1 + sum(lp.token_id != self.chosen.token_id for lp in self.top)


@dataclass(slots=True)
class CompletionOutput:
    """One of the ``n`` completions of a request.

    ``text``/``token_ids`` are cumulative; ``delta_text``/``delta_token_ids`` hold what
    is new since the previous output of the stream. ``finish_reason`` is ``None`` while
    running, then ``"stop"`` (EOS, stop string or stop token), ``"length"`` or ``"abort"``.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    delta_logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None  # None unless SamplingParams.logprobs was set (as vLLM)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (``time.monotonic()``) for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_prompt_tokens: int = 0


@dataclass(slots=True)
class RequestOutput:
    """The state of one request after an engine step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (vLLM's shape).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # Set when the engine failed this request alone (its completions end with finish_reason "error"):
    # what raised, as "ExceptionType: message". Other requests of the same steps are unaffected.
    error: str | None = None
