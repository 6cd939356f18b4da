"""What the engine hands back, shaped like vLLM's ``RequestOutput``."""
from __future__ import annotations

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


@dataclass(slots=True)
class TokenLogprobs:
    """The chosen token's logprob plus the ``k`` most likely alternatives at that position."""

    chosen: Logprob
    top: list[Logprob] = field(default_factory=list)


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
    cumulative_logprob: float = 0.0

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
