"""The chat pipeline stages for the ``rag`` field of a chat request.

The pre-stage retrieves and rewrites the conversation into the layered prompt (the retrieved chunks go
fenced into the last user turn, never into the system message); the post- and stream stages read each
finished answer and keep ``turn.metadata["sources"]`` (the cited chunks) for the route to return. When no
chunk passes the relevance threshold, the pre-stage answers itself with ``turn.metadata["reply"]`` ("the
documents do not contain ...") instead of letting the model guess.
"""
from __future__ import annotations

from dataclasses import replace

from servelm.serving.errors import ServingError
from servelm.serving.pipeline import ChatTurn, RequestPipeline


def rag_error(exc: BaseException, param: str | None = None) -> ServingError:
    """Returns the ServingError for an exception from RagService (404 unknown collection, 409 taken, 400 bad input)."""
    from servelm.rag.service import http_status

    status = http_status(exc)
    if status == 500:
        raise exc
    code = {404: "collection_not_found", 409: "collection_exists"}.get(status, "invalid_value")
    message = str(exc.args[0]) if exc.args else str(exc)
    return ServingError(status, message, param=param, code=code)


class _SourceRecorder:
    """A stream stage that passes text through and records the finished answer's citations."""

    passthrough = True  # the text is not changed, so the chat route may keep sending token logprobs

    def __init__(self, turn: ChatTurn, guarding):
        self.turn, self.guarding = turn, guarding
        self.parts: list[str] = []

    async def feed(self, delta: str) -> str:
        self.parts.append(delta)
        return delta

    async def end(self) -> str:
        await _record(self.turn, "".join(self.parts), self.guarding)
        return ""


async def _record(turn: ChatTurn, answer: str, guarding) -> None:
    # Sources of every choice, first-cited first, each chunk once; their snippets pass the output PII policy.
    from servelm.rag.answer import cited_sources

    hits = turn.metadata.get("rag_hits")
    if hits is None:
        return
    sources = turn.metadata.setdefault("sources", [])
    seen = {s["chunk_id"] for s in sources}
    new = [s for s in cited_sources(answer, hits) if s["chunk_id"] not in seen]
    texts = {h.chunk.id: h.chunk.text for h in hits}
    chunks = [texts[s["chunk_id"]] for s in new]
    windows = [(max(c.find(s["snippet"]), 0), max(c.find(s["snippet"]), 0) + len(s["snippet"]))
               for c, s in zip(chunks, new)]
    # each snippet redacted as its whole chunk is (GET .../chunks/{id}): the snippet stays a substring of it
    snippets = await guarding.redact_sources(chunks, turn.request_id, turn.key_name,
                                             turn.metadata.get("supplied", ""), windows=windows)
    for s, snippet in zip(new, snippets):
        s["snippet"] = snippet
    sources.extend(new)


def install(pipeline: RequestPipeline, ctx) -> None:
    """Adds the RAG stages to ``pipeline`` (after any stages already there) and marks ``rag`` handled.

    A prompt strategy stage before it leaves ``metadata["prompt_request"]`` (and ``"strategy"``) for a
    ``rag`` request instead of rendering: the RAG pre-stage renders it with the retrieved context."""

    async def pre(turn: ChatTurn) -> None:
        if turn.rag is None:
            return
        from servelm.rag.answer import NO_ANSWER
        from servelm.rag.schemas import RagOptions

        opts = RagOptions(collection=turn.rag.collection, k=turn.rag.k, filters=turn.rag.filters,
                          min_relevance=turn.rag.min_relevance)
        # With a prompt strategy, the strategy renders the prompt around the numbered context.
        req, strategy = turn.metadata.get("prompt_request"), turn.metadata.get("strategy")
        render = (lambda context: strategy.messages(replace(req, context=context))) if req is not None else None
        try:
            async with ctx.admission.lanes["rag"].slot(turn.key_name):
                messages, hits = await ctx.rag.augment(turn.messages, opts, render)
        except (LookupError, ValueError) as e:
            raise rag_error(e, "rag.collection" if isinstance(e, LookupError) else "rag") from None
        turn.metadata["sources"] = []
        if not hits:
            turn.metadata["reply"] = NO_ANSWER
            return
        # The client's system message is the deployment's own instruction: keep it, ahead of the RAG rules.
        own = "\n\n".join(m["content"] for m in turn.messages if m["role"] == "system" and m["content"])
        if own and render is None and messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{own}\n\n{messages[0]['content']}"}
        turn.messages = messages
        turn.metadata["rag_hits"] = hits

    async def post(turn: ChatTurn, text: str) -> str:
        await _record(turn, text, ctx.guarding)
        return text

    def stream(turn: ChatTurn):
        return _SourceRecorder(turn, ctx.guarding)

    pipeline.pre.append(pre)
    pipeline.post.append(post)
    pipeline.stream.append(stream)
    pipeline.features = pipeline.features | {"rag"}
