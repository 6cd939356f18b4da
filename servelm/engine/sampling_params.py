"""Per-request sampling parameters, shaped like vLLM's ``SamplingParams``."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

INT64_MIN, UINT64_END = -(1 << 63), 1 << 64  # a seed is any 64-bit integer, signed or not (torch's range)


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
    speculative: bool = True  # False: this request never uses the engine's speculative decoding
    structured_output: StructuredOutputParams | None = None  # constrained decoding (JSON schema, regex, ...)
    logit_bias: dict[int, float] | None = None
    # vLLM's names, so scripts written for vLLM run unchanged:
    skip_special_tokens: bool = True  # drop special tokens (e.g. <|im_end|>) from the text
    spaces_between_special_tokens: bool = True  # accepted; fast tokenizers (all servelm loads) do not use it
    detokenize: bool = True  # False: token ids only, ``text`` stays empty (no stop strings)
    allowed_token_ids: list[int] | None = None  # sample only among these ids
    bad_words: list[str] | None = None  # words never to generate (vLLM's token-sequence rule, see sampling.py)
    # vLLM's per-request logits processors: each ``fn(output_token_ids, logits)`` or ``fn(prompt_token_ids,
    # output_token_ids, logits)`` gets one row's float32 logits and returns them (changed in place or new)
    logits_processors: list[Callable] | None = field(default=None, compare=False)
    truncate_prompt_tokens: int | None = None  # keep only the last k prompt tokens (-1: the context window)
    best_of: int | None = None  # accepted when equal to n (servelm returns every completion it samples)
    output_kind: object = None  # ignored: LLM returns final outputs, AsyncEngine streams cumulative + delta
    structured_outputs: object = None  # vLLM >= 0.10.2's name for structured_output (object or dict)
    guided_decoding: object = None  # vLLM <= 0.10's name for structured_output (object or dict)
    # bad_words as token-id sequences, filled by the engine from its tokenizer (vLLM's _bad_words_token_ids)
    bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        for alias in ("structured_outputs", "guided_decoding"):
            given = getattr(self, alias)
            if given is None:
                continue
            if self.structured_output is not None:
                raise InvalidRequestError(f"pass structured_output or {alias}, not both.", alias)
            self.structured_output = structured_output_from(given, alias)
            setattr(self, alias, None)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise :class:`InvalidRequestError` naming the first bad field.

        With ``vocab_size`` (the engine passes its model's) every token id the parameters carry
        (``stop_token_ids``, ``logit_bias`` keys, ``allowed_token_ids``, ``bad_words`` ids) must also be
        below it: the sampler indexes the logits with them, so an id outside the vocabulary must never
        reach a step."""
        for name in ("n", "max_tokens", "top_k", "seed", "min_tokens", "logprobs", "prompt_logprobs",
                     "truncate_prompt_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise InvalidRequestError(f"{name} must be an integer, got {v!r}.", name)
        if self.n < 1:
            raise InvalidRequestError(f"n must be at least 1, got {self.n}.", "n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")
        if self.seed is not None and not INT64_MIN <= self.seed < UINT64_END:
            raise InvalidRequestError(f"seed must be a 64-bit integer, got {self.seed}.", "seed")
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
        if self.logprobs == -1 or self.prompt_logprobs == -1:
            name = "logprobs" if self.logprobs == -1 else "prompt_logprobs"
            raise InvalidRequestError(f"{name}=-1 (the whole vocabulary) is not supported; ask for at most 20.", name)
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
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) cannot exceed max_tokens ({self.max_tokens}).",
                                      "min_tokens")
        _check_token_ids("stop_token_ids", self.stop_token_ids, vocab_size)
        if self.structured_output is not None:
            self.structured_output.validate()
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError(f"best_of={self.best_of} with n={self.n} is not supported: servelm returns all "
                                      "the completions it samples; set n instead.", "best_of")
        if not self.detokenize and self.stop:
            raise InvalidRequestError("stop strings need detokenize=True (the text is what they match).", "stop")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise InvalidRequestError("allowed_token_ids must be a non-empty list of token ids.",
                                          "allowed_token_ids")
            _check_token_ids("allowed_token_ids", self.allowed_token_ids, vocab_size)
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise InvalidRequestError("bad_words must be a list of non-empty strings.", "bad_words")
        if self.truncate_prompt_tokens is not None and (
                not isinstance(self.truncate_prompt_tokens, int) or self.truncate_prompt_tokens == 0
                or self.truncate_prompt_tokens < -1):
            raise InvalidRequestError(f"truncate_prompt_tokens must be -1 or >= 1, got {self.truncate_prompt_tokens}.",
                                      "truncate_prompt_tokens")
        if self.logit_bias:
            _check_token_ids("logit_bias", list(self.logit_bias), vocab_size, "logit_bias keys")
            bad = [v for v in self.logit_bias.values() if not -100.0 <= v <= 100.0]
            if bad:
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {bad[0]}.", "logit_bias")
            if len(self.logit_bias) > 300:  # OpenAI's limit
                raise InvalidRequestError("logit_bias may set at most 300 tokens.", "logit_bias")
        for word in self.bad_words_token_ids or ():
            _check_token_ids("bad_words", word, vocab_size, "bad_words token ids")
        if self.logits_processors is not None and (not isinstance(self.logits_processors, (list, tuple))
                                                   or any(not callable(f) for f in self.logits_processors)):
            raise InvalidRequestError("logits_processors must be a list of callables.", "logits_processors")


def _check_token_ids(param: str, ids, vocab_size: int | None, what: str | None = None) -> None:
    """Raise :class:`InvalidRequestError` naming ``param`` unless every one of ``ids`` is an integer token id
    in ``[0, vocab_size)`` (only ``>= 0`` while the vocabulary is not known)."""
    what = what or param
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool):
            raise InvalidRequestError(f"{what} must be token ids (integers), got {t!r}.", param)
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            span = f"0 to {vocab_size - 1}" if vocab_size is not None else "integers >= 0"
            raise InvalidRequestError(f"{what} must be token ids of this model's vocabulary ({span}); got {t}.",
                                      param)


def logits_processor_arity(fn: Callable) -> int:
    """Returns 3 for vLLM's ``fn(prompt_token_ids, output_token_ids, logits)`` form, else 2."""
    try:
        return 3 if len(inspect.signature(fn).parameters) == 3 else 2
    except (TypeError, ValueError):  # a builtin without a signature: the common two-argument form
        return 2


# The keys of vLLM's GuidedDecodingParams / StructuredOutputsParams that only pick or tune a backend: they do
# not change what output is allowed, so they are accepted and ignored.
_BACKEND_KEYS = ("backend", "disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                 "backend_was_auto", "_backend", "_backend_was_auto")


def structured_output_from(spec, param: str = "structured_outputs") -> StructuredOutputParams:
    """Returns ``spec`` (a :class:`StructuredOutputParams`, a dict, or an object such as vLLM's
    ``StructuredOutputsParams``/``GuidedDecodingParams``) as servelm's :class:`StructuredOutputParams`.

    Raises :class:`InvalidRequestError` naming a key servelm cannot honour (e.g. ``structural_tag``)."""
    if isinstance(spec, StructuredOutputParams):
        return spec
    kinds = ("json", "json_object", "regex", "choice", "grammar")
    if isinstance(spec, dict):
        items = dict(spec)
    else:  # vLLM's are dataclasses; read the kinds as attributes, the rest from the fields or __dict__
        names = set(getattr(spec, "__dataclass_fields__", None) or getattr(spec, "__dict__", {})) | set(kinds)
        items = {k: getattr(spec, k, None) for k in names}
    extra = [k for k, v in items.items() if k not in kinds and k not in _BACKEND_KEYS and v not in (None, False)]
    if extra:
        raise InvalidRequestError(f"{param}.{extra[0]} is not supported; use one of {', '.join(kinds)}.",
                                  f"{param}.{extra[0]}")
    return StructuredOutputParams(**{k: items[k] for k in kinds if items.get(k) is not None})
