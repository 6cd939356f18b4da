"""Hook points around a chat request: pre-stages rewrite the conversation, post-stages the answer.

The pipeline itself ships no stages. The guard (:mod:`servelm.serving.guard`) and RAG
(:mod:`servelm.serving.rag`) fill them; an application may pass its own to ``create_app(..., pipeline=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from servelm.serving.errors import BadInput


@dataclass(slots=True)
class ChatTurn:
    """One chat request as the stages see it. Stages may replace ``messages`` and fill ``metadata``.

    Keys the chat route reads: ``metadata["reply"]`` (set by a pre-stage: the answer of every choice,
    no generation) and ``metadata["sources"]`` (a list returned as the response's top-level ``sources``,
    in streams as a last chunk with ``choices: []``).
    """

    messages: list[dict]            # [{"role": ..., "content": ...}] in OpenAI roles
    strategy: str | None            # the request's prompt strategy name, if any
    rag: Any                        # the request's retrieval options (collection, k, filters, ...), if any
    key_name: str                   # who is asking (never the key itself)
    request_id: str
    metadata: dict = field(default_factory=dict)
    # Set by a pre-stage that holds the request (e.g. for human review): the client gets this answer and
    # the model is not called.
    held: "Answer | None" = None


@dataclass(slots=True)
class Answer:
    """What a choice's client receives after the post-stages."""

    text: str
    finish_reason: str | None = None  # overrides the engine's, e.g. "content_filter"
    extras: dict = field(default_factory=dict)  # extra message fields, e.g. {"reasoning_content": ...}
    servelm: dict = field(default_factory=dict)  # servelm's response annotations, e.g. {"review_id": ...}

    def hides(self, written: str) -> bool:
        """True when this answer is not what the model ``written`` (redacted, filtered or held): its token
        logprobs must then be dropped, since they would give the changed text away."""
        return self.text not in (written, written.strip()) or self.finish_reason is not None


class StreamStage(Protocol):
    """Rewrites a stream of text deltas (e.g. an output guard that holds back partial words).

    A stage may also carry ``finish_reason`` (not None once it has ended the choice, e.g.
    "content_filter") and ``servelm`` (annotations for the last chunk); the route reads both.
    """

    async def feed(self, delta: str) -> str: ...

    async def end(self) -> str: ...


# A pre-stage may rewrite turn.messages or refuse the request by raising a servelm.serving.errors.ServingError.
PreStage = Callable[[ChatTurn], Awaitable[None]]
# A post-stage gets the full answer of one choice and returns what the client receives: a string, or an
# Answer to also set the finish reason or extra fields.
PostStage = Callable[[ChatTurn, str], Awaitable["str | Answer"]]
# Streaming requests get a fresh StreamStage per choice from each factory.
StreamStageFactory = Callable[[ChatTurn], StreamStage]


@dataclass(slots=True)
class RequestPipeline:
    """Ordered stages run by the chat route. ``features`` names the request extensions the stages handle
    (``"strategy"``, ``"rag"``); a request using one no stage handles gets a 400 instead of being ignored."""

    pre: list[PreStage] = field(default_factory=list)
    # Pre-stages that must see the finished prompt (e.g. a canary added to the system message): after ``pre``.
    finish: list[PreStage] = field(default_factory=list)
    post: list[PostStage] = field(default_factory=list)
    stream: list[StreamStageFactory] = field(default_factory=list)
    features: frozenset[str] = frozenset()

    async def before(self, turn: ChatTurn) -> None:
        """Runs the pre-stages in order. Raises BadInput for an unsupported extension."""
        if turn.rag is not None and "rag" not in self.features:
            raise BadInput("This server has no retrieval configured; remove 'rag' from the request.", "rag",
                          "unsupported_parameter")
        if turn.strategy is not None and "strategy" not in self.features:
            raise BadInput("This server has no prompt strategies configured; remove 'strategy'.", "strategy",
                          "unsupported_parameter")
        for stage in self.pre + self.finish:
            if turn.held is not None:  # a held request is not rewritten further
                return
            await stage(turn)

    async def after(self, turn: ChatTurn, text: str) -> str:
        """Returns ``text`` passed through every post-stage."""
        return (await self.answer(turn, text)).text

    async def answer(self, turn: ChatTurn, text: str) -> Answer:
        """Returns the :class:`Answer` for ``text`` after every post-stage (each sees the earlier ones' text)."""
        answer = Answer(text)
        for stage in self.post:
            r = await stage(turn, answer.text)
            if isinstance(r, Answer):
                answer = Answer(r.text, r.finish_reason or answer.finish_reason, answer.extras | r.extras,
                                answer.servelm | r.servelm)
            else:
                answer.text = r
            if answer.finish_reason == "content_filter":
                break  # nothing after a filter may bring text back
        return answer

    def stream_stages(self, turn: ChatTurn) -> list[StreamStage]:
        """Returns fresh stream stages for one streamed choice."""
        return [make(turn) for make in self.stream]


async def run_stream_stages(stages: list[StreamStage], delta: str, final: bool) -> str:
    """Returns ``delta`` after every stage (and, when ``final``, what the stages held back)."""
    for i, stage in enumerate(stages):
        delta = await stage.feed(delta)
        if final:
            tail = await stage.end()
            # what a stage releases at the end still passes through the later stages
            for later in stages[i + 1:]:
                tail = await later.feed(tail)
            delta += tail
    return delta
