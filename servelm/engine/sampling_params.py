"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``."""
from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequestError(ValueError):
    """A request the user can fix. ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(slots=True)
class StructuredOutputParams:
    """Constrain the output to exactly one of: a JSON schema, any JSON object, a regex, one of a list of
    strings, or an EBNF grammar (xgrammar's dialect). Shaped like vLLM's ``StructuredOutputsParams``;
    see ``servelm.engine.structured_output`` for how it is enforced."""

    json: dict | str | None = None  # a JSON schema, as a dict or its JSON text
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @property
    def kind(self) -> str:
        """The one constraint set: "json", "json_object", "regex", "choice" or "grammar"."""
        return next(k for k in ("json", "json_object", "regex", "choice", "grammar") if getattr(self, k))

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` naming the field unless exactly one well-typed kind is set."""
        given = [k for k in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_output needs exactly one of json, json_object, regex, choice or grammar; "
                f"got {', '.join(given) or 'none'}.", "structured_output")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError("structured_output.json must be a JSON schema (an object or its JSON text).",
                                      "structured_output.json")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(f"structured_output.{name} must be a non-empty string.",
                                          f"structured_output.{name}")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise InvalidRequestError("structured_output.choice must be a non-empty list of non-empty strings.",
                                      "structured_output.choice")


@dataclass(slots=True)
class SamplingParams:
    """How to pick the next token and when to stop.

    ``temperature == 0`` means greedy. ``seed`` makes sampling reproducible
    whatever else is in the batch. ``n`` completions share the prompt's KV blocks.
    ``structured_output`` constrains every completion to a JSON schema, regex, choice or grammar.
    ``logit_bias`` maps token ids to a value in [-100, 100] added to their logits before sampling
    (OpenAI's semantics: -100 bans a token, +100 all but forces it).
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token (0 = only the chosen one)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (scoring, echo)
    min_tokens: int = 0
    structured_output: StructuredOutputParams | None = None  # constrained decoding (JSON schema, regex, ...)
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` naming the first bad field."""
        if not isinstance(self.n, int) or self.n < 1:
            raise InvalidRequestError(f"n must be at least 1, got {self.n}.", "n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}.", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}.", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}.", "min_p")
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}.", "repetition_penalty")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequestError(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.", "presence_penalty")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequestError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.", "frequency_penalty")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs}.", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidRequestError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}.",
                                      "prompt_logprobs")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings.", "stop")
        if len(self.stop) > 16:
            raise InvalidRequestError("at most 16 stop strings are allowed.", "stop")
        if self.min_tokens < 0:
            raise InvalidRequestError(f"min_tokens must be >= 0, got {self.min_tokens}.", "min_tokens")
        if self.structured_output is not None:
            self.structured_output.validate()
        if self.logit_bias:
            if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.logit_bias):
                raise InvalidRequestError("logit_bias keys must be token ids (integers >= 0).", "logit_bias")
            bad = [v for v in self.logit_bias.values() if not -100.0 <= v <= 100.0]
            if bad:
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {bad[0]}.", "logit_bias")
            if len(self.logit_bias) > 300:  # OpenAI's limit
                raise InvalidRequestError("logit_bias may set at most 300 tokens.", "logit_bias")
