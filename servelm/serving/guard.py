"""Composes the guardrails (``servelm.safety``) and prompt strategies (``servelm.prompts``) into requests.

``build_guarding(settings, registry)`` returns the deployment's :class:`Guarding`; ``pipeline()``
gives the chat route its stages (input guard, strategy, answer post-processing, streamed output
guard) and :func:`call_engine` runs an engine call behind the circuit breaker and fallback.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from servelm.engine import InvalidRequestError, RequestFailedError
from servelm.prompts import ChainOfThought, Example, PromptRequest, UnknownStrategyError, resolve_strategy
from servelm.prompts.strategies import DEFAULT_SYSTEM
from servelm.safety import (BreakerConfig, CircuitBreaker, FallbackResult, Guard, OverloadedError, PolicyError,
                            ResilientCaller, StaticFallback)
from servelm.safety.metrics import GuardMetrics
from servelm.safety.scaffolding import strip_scaffolding
from servelm.serving.errors import BadInput, ClientGone, Refused, ServingError
from servelm.serving.pipeline import Answer, ChatTurn, RequestPipeline

T = TypeVar("T")
_ENGINE_CODES = {"engine_error", "engine_unavailable"}
# settings.fallback_on's names -> the ResilientCaller's failure reasons
_FALLBACK_REASONS = {"engine_error": "error", "circuit_open": "circuit_open", "timeout": "timeout",
                     "overloaded": "overloaded"}
_INJECTION_SCANNERS = {"injection_rules", "prompt_injection"}


@dataclass(slots=True)
class Guarding:
    """The deployment's guard (None with ``--no-guard``), engine fallback and default strategy."""

    guard: Guard | None
    caller: ResilientCaller | None
    default_strategy: str | None
    fallback_on: frozenset[str] = field(default_factory=frozenset)
    context_tokens: int = 0  # the served context window, set once the engine is up (see :meth:`serve_context`)

    def serve_context(self, max_model_len: int) -> None:
        """Fits the guard's "auto" input-length limit to the served context: 8 characters per token (no real
        text averages more), at least the standalone 32,000, so text that fits the model is never refused."""
        self.context_tokens = max_model_len
        if self.guard is not None:
            self.guard.default_max_input_chars = max(32_000, 8 * max_model_len)

    def pipeline(self) -> RequestPipeline:
        """Returns the chat route's stages: input guard and strategy before, answer guard after."""
        return RequestPipeline(pre=[self._check_input, self.apply_strategy], finish=[self._add_canary],
                               post=[self._finish_answer],
                               stream=[lambda turn: ChoiceStream(self, turn)], features=frozenset({"strategy"}))

    # -- input ------------------------------------------------------------------------------------
    async def _check_input(self, turn: ChatTurn) -> None:
        if self.guard is None:
            return
        # What the end user wrote, before strategies or RAG add to the messages: PII the answer repeats from
        # it is not redacted (system prompts, tool results and documents may hold others' data: redacted).
        turn.metadata["supplied"] = _user_text(turn.messages)
        d = await self.guard.acheck_messages(turn.messages, request_id=turn.request_id, api_key=turn.key_name)
        if d.action == "block":
            raise self._refusal(d, "messages")
        if d.action == "review":
            turn.held = held_answer(d)
        elif d.action == "redact":  # e.g. secrets in input, when the policy redacts them: per message
            for m in turn.messages:
                if m["role"] != "assistant" and m["content"]:
                    m["content"] = (await self.guard.acheck_input(m["content"], request_id=turn.request_id,
                                                                  api_key=turn.key_name)).text

    async def check_prompt(self, text: str, request_id: str, key_name: str, param: str = "prompt",
                           markers: tuple[str, ...] = ()) -> Answer | None:
        """Scans a raw prompt (completions, /generate, RAG queries); returns a held Answer for review, None to
        go on. A prompt the client rendered with a chat template is scanned without its turn markers and role
        labels (``markers``: the served model's special tokens; :mod:`servelm.safety.scaffolding`).

        Raises Refused (code "content_filter") when the policy blocks it.
        """
        if self.guard is None:
            return None
        d = await self.guard.acheck_input(strip_scaffolding(text, markers), request_id=request_id, api_key=key_name)
        if d.action == "block":
            raise self._refusal(d, param)
        return held_answer(d) if d.action == "review" else None

    def _refusal(self, d, param: str) -> Refused:
        """The 400 for a blocked input: ``context_length_exceeded`` when only its length is the problem (what
        clients' context-window fallbacks look for, as for an over-long prompt), else ``content_filter``."""
        if d.scanner == "length":
            return Refused(f"The input is too long for this model's maximum context length "
                           f"({self.context_tokens} tokens): {d.reason}. Please reduce the length of the messages.",
                           param, "context_length_exceeded")
        return content_filtered(d.message, param)

    async def screen_documents(self, hits: list, request_id: str | None = None) -> list:
        """Returns the retrieved ``hits`` (``servelm.rag`` Hits) without those carrying an injected instruction.

        A retrieved chunk is third-party text in the prompt: indirect prompt injection arrives there (NeMo
        Guardrails' retrieval rails, LLM Guard on RAG context). Each chunk is scanned like user input and
        dropped when an injection scanner refuses it; the answer comes from the others (or "the documents do
        not contain ..." when none is left). Other findings (a credential in a runbook) keep the chunk: the
        output guard redacts what the answer repeats."""
        if self.guard is None:
            return hits
        # a chunk cannot wait for a reviewer: "review" acts as "block" here (and files nothing in the queue)
        no_review = {"scanners": {name: {"action": "block"} for name, sp in self.guard.policy.scanners.items()
                                  if sp.action == "review"}}
        kept = []
        for h in hits:
            d = await self.guard.acheck_input(h.chunk.text, request_id=request_id, policy_overrides=no_review)
            if d.allowed or d.scanner not in _INJECTION_SCANNERS:
                kept.append(h)
        return kept

    # -- prompt strategy --------------------------------------------------------------------------
    async def apply_strategy(self, turn: ChatTurn) -> None:
        """Rewrites ``turn.messages`` into the prompt strategy's messages (none named: left as sent)."""
        name = turn.strategy or self.default_strategy
        if name is None:
            return  # plain OpenAI behaviour: the messages as sent
        try:
            strategy = resolve_strategy(name)
        except UnknownStrategyError as e:
            raise BadInput(e.message, "strategy", "invalid_value") from None
        system = "\n\n".join(m["content"] for m in turn.messages if m["role"] == "system" and m["content"])
        convo = [m for m in turn.messages if m["role"] in ("user", "assistant")]
        last = max((i for i, m in enumerate(convo) if m["role"] == "user"), default=None)
        if last is None or not convo[last]["content"].strip():
            raise BadInput("A prompt strategy needs a non-empty user message.", "messages")
        examples = [Example(e["input"], e["output"]) for e in turn.metadata.get("examples") or []] or None
        # The client's system message is the API key holder's own instruction (OpenAI semantics); user and
        # document text stays fenced in user turns (servelm.prompts.layered).
        req = PromptRequest(question=convo[last]["content"], system=system or DEFAULT_SYSTEM,
                            history=convo[:last], examples=examples)
        turn.metadata["strategy"] = strategy
        if turn.rag is not None:  # the RAG stage renders it around the retrieved context (servelm.serving.rag)
            turn.metadata["prompt_request"] = req
            return
        turn.messages = strategy.messages(req)

    async def _add_canary(self, turn: ChatTurn) -> None:
        # With a canary in the policy, the system message carries it, so a leak of the system prompt
        # shows in the output (the system_prompt_leak scanner).
        line = self.guard.canary_instruction(turn.key_name) if self.guard is not None else ""
        if not line:
            return
        first = next((m for m in turn.messages if m["role"] == "system"), None)
        if first is None:
            turn.messages.insert(0, {"role": "system", "content": line})
        else:
            first["content"] = f"{first['content']}\n\n{line}" if first["content"] else line

    # -- output -----------------------------------------------------------------------------------
    async def _finish_answer(self, turn: ChatTurn, text: str) -> Answer:
        reasoning = None
        strategy = turn.metadata.get("strategy")
        if strategy is not None:
            out = strategy.postprocess(text, bool(turn.metadata.get("include_reasoning")))
            text, reasoning = out.answer, out.reasoning
        supplied = turn.metadata.get("supplied")
        answer = await self.scan_output(text, turn.request_id, turn.key_name, _question(turn), _system(turn), supplied)
        if reasoning is not None and answer.finish_reason is None:
            r = await self.scan_output(reasoning, turn.request_id, turn.key_name, _question(turn), _system(turn),
                                       supplied)
            if r.finish_reason is None:  # blocked reasoning is dropped, not shown
                answer.extras["reasoning_content"] = r.text
        return answer

    async def scan_output(self, text: str, request_id: str, key_name: str, prompt: str | None = None,
                          system_prompt: str = "", supplied: str | None = None) -> Answer:
        """Returns ``text`` as the client may see it: redacted, or emptied with finish_reason content_filter.
        PII found whole in ``supplied`` (what the end user wrote) is not redacted."""
        if self.guard is None:
            return Answer(text)
        d = await self.guard.acheck_output(text, request_id=request_id, prompt=prompt, system_prompt=system_prompt,
                                           api_key=key_name, supplied=supplied)
        if d.action == "review":
            return held_answer(d)
        if d.action == "block":
            return Answer("", "content_filter", servelm={"content_filter": {"scanner": d.scanner, "reason": d.reason},
                                                         **guard_note(d)})
        return Answer(d.text, servelm=guard_note(d))

    async def redact_sources(self, texts: list[str], request_id: str, key_name: str, supplied: str = "",
                             windows: list[tuple[int, int]] | None = None) -> list[str]:
        """Returns retrieved text sent beside an answer (RAG sources, chunks) with the output PII policy
        applied: PII the policy does not allow becomes ``<ENTITY_TYPE>`` (servelm.safety.Guard.redact_pii),
        except values found whole in ``supplied`` (the caller's question). With ``windows`` the texts are
        whole chunks and each result is the window ``[a, b)`` of one, redacted as its chunk is."""
        if self.guard is None or not texts:
            return texts if windows is None else [t[a:b] for t, (a, b) in zip(texts, windows)]
        return await self.guard.aredact_pii(texts, request_id=request_id, api_key=key_name, supplied=supplied,
                                            windows=windows)

    def stream_scanner(self, request_id: str, key_name: str, prompt: str | None, supplied: str = "") -> "ChoiceStream":
        """Returns a stream stage guarding one streamed completion choice (no strategy); ``supplied`` as in
        :meth:`scan_output`."""
        turn = ChatTurn([], None, None, key_name, request_id)
        turn.metadata["supplied"] = supplied
        return ChoiceStream(self, turn, prompt=prompt)


class ChoiceStream:
    """One streamed choice: holds a chain-of-thought answer to the end, then redacts or stops its text."""

    def __init__(self, g: Guarding, turn: ChatTurn, prompt: str | None = None):
        self.strategy = turn.metadata.get("strategy")
        self.hold_all = isinstance(self.strategy, ChainOfThought)  # only the final answer is sent
        self.scanner = (g.guard.output_stream(request_id=turn.request_id, api_key=turn.key_name,
                                              prompt=prompt if prompt is not None else _question(turn),
                                              supplied=turn.metadata.get("supplied", ""))
                        if g.guard is not None else None)
        self.finish_reason: str | None = None
        self.servelm: dict | None = None
        self._raw = ""

    @property
    def passthrough(self) -> bool:
        """True when this stage sends every delta as it comes (no guard, no held answer)."""
        return self.scanner is None and not self.hold_all

    async def feed(self, delta: str) -> str:
        """Returns the text that may leave the server now."""
        if self.hold_all:
            self._raw += delta
            return ""
        return await self._scan(delta)

    async def end(self) -> str:
        """Returns what was held back, redacted (the final answer for chain of thought)."""
        text = ""
        if self.hold_all:
            text = await self._scan(self.strategy.postprocess(self._raw).answer)
        if self.scanner is not None and self.finish_reason is None:
            text += await self.scanner.afinish()
            text += self._check()
            if self.finish_reason is None:  # the answer's last chunk says what the guard redacted
                self.servelm = guard_note(self.scanner.decision) or None
        return text

    async def _scan(self, delta: str) -> str:
        if self.scanner is None or self.finish_reason is not None:
            return delta if self.scanner is None else ""
        return await self.scanner.afeed(delta) + self._check()

    def _check(self) -> str:
        if self.finish_reason is None and self.scanner.blocked:
            d = self.scanner.decision
            self.finish_reason = "content_filter"
            if d is not None and d.review_id:
                self.servelm = {"review_id": d.review_id, **guard_note(d)}
                return d.held_response or ""
            self.servelm = {"content_filter": {"scanner": d.scanner if d else None, "reason": d.reason if d else ""},
                            **(guard_note(d) if d else {})}
        return ""


def _user_text(messages: list[dict]) -> str:
    """The text of the user turns of ``messages``."""
    parts = []
    for m in messages:
        if m.get("role") != "user":
            continue
        c = m.get("content")
        if isinstance(c, list):
            c = "\n".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
        parts.append(str(c or ""))
    return "\n".join(parts)


def _question(turn: ChatTurn) -> str | None:
    return next((m["content"] for m in reversed(turn.messages) if m["role"] == "user"), None)


def _system(turn: ChatTurn) -> str:
    return "\n".join(m["content"] for m in turn.messages if m["role"] == "system" and m["content"])


def content_filtered(message: str, param: str) -> Refused:
    """Returns the refusal of a blocked request (OpenAI's ``content_filter`` code; the message names the scanner)."""
    return Refused(message, param)


def held_answer(d) -> Answer:
    """Returns the Answer for a request or response sent to human review."""
    return Answer(d.held_response or "", "content_filter", servelm={"review_id": d.review_id, "status": "pending",
                                                                    **guard_note(d)})


def guard_note(d) -> dict:
    """Returns the ``servelm`` annotation of an answer whose text the guard changed or held: ``{"guard":
    {"action": "redact", "redactions": [{"scanner", "kind", "count"}, ...]}}``, or for a held or blocked one
    ``{"guard": {"action": "review" | "block", "scanner", "reason"}}``; ``{}`` when the text went out as written.

    Every route and stream takes the annotation from here, so a client can always tell a changed answer
    from the model's own words (streams: in the choice's last chunk)."""
    if d.action == "redact" and d.redactions:
        return {"guard": {"action": "redact", "redactions": d.redactions}}
    if d.action in ("block", "review"):
        return {"guard": {"action": d.action, "scanner": d.scanner, "reason": d.reason}}
    return {}


# -- engine calls behind the breaker --------------------------------------------------------------
def _is_failure(exc: BaseException) -> bool:
    """True for errors that say the engine is unwell (not the client's: bad input, limits, leaving)."""
    if isinstance(exc, ServingError):
        return exc.code in _ENGINE_CODES
    # RequestFailedError: the engine failed that one request and served the rest, so it stays healthy
    return not isinstance(exc, (ClientGone, InvalidRequestError, ValueError, RequestFailedError))


async def call_engine(g: Guarding, request_id: str, fn: Callable[[], Awaitable[T]]) -> T | FallbackResult:
    """Returns ``await fn()``, or a marked FallbackResult when the engine failed and a fallback answered.

    Raises what ``fn`` raised for client errors (400, 429, ...) and when no fallback is configured.
    """
    if g.caller is None:
        return await fn()

    async def attempt():
        try:
            return await fn()
        except ServingError as e:  # the server's own timeout/overload errors degrade only where configured
            if e.code == "request_timeout" and "timeout" in g.fallback_on:
                raise TimeoutError(e.message) from e
            if e.code == "server_overloaded" and "overloaded" in g.fallback_on:
                raise OverloadedError(e.message) from e
            raise

    r = await g.caller.call("", attempt, request_id=request_id)
    return r if r.fallback else r.text


def fallback_headers(r: FallbackResult) -> dict[str, str]:
    """Returns the response header that marks a fallback answer."""
    return {"x-servelm-fallback": f"{r.kind}; reason={r.reason}"}


def _plugin(spec: str):
    """Returns the function ``module:function`` names (a guard plugin); raises PolicyError naming what is wrong."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError) as e:
        raise PolicyError(f"guard_plugins: cannot load {spec!r} ({e}); give module:function") from None
    if not callable(fn):
        raise PolicyError(f"guard_plugins: {spec!r} is not a module:function")
    return fn


def build_guarding(settings, registry) -> Guarding:
    """Returns the guard, breaker and fallback ``settings`` ask for (metrics on ``registry``), with the
    scanners of ``settings.guard_plugins`` added.

    Raises servelm.safety.PolicyError for a bad policy file or a plugin that cannot be loaded.
    """
    guard = None
    if not settings.no_guard:
        guard = Guard.from_policy(settings.policy, review_db=settings.pg_url or settings.reviews_db,
                                 registry=registry)
        for spec in filter(None, (settings.guard_plugins or "").split(",")):
            _plugin(spec.strip())(guard)
    caller = None
    if settings.fallback == "static":
        breaker = CircuitBreaker("engine", BreakerConfig(settings.breaker_failures, settings.breaker_reset_s,
                                                         call_timeout_s=None))  # the request timeout governs
        answer_on = frozenset(_FALLBACK_REASONS[f] for f in settings.fallback_on)
        caller = ResilientCaller(breaker, [StaticFallback(settings.fallback_message)],
                                 metrics=GuardMetrics.get(registry), is_failure=_is_failure, answer_on=answer_on)
        caller.metrics.breaker_state.labels("engine").set(0)
    if settings.default_strategy is not None:
        resolve_strategy(settings.default_strategy)  # fail at start, not on the first request
    return Guarding(guard, caller, settings.default_strategy, frozenset(settings.fallback_on))

