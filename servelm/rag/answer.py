"""Grounded answers: the layered prompt with numbered chunks, fitted to the context window,
and the parsing of ``[n]`` citations back to sources."""
from __future__ import annotations

import re
from typing import Callable

from servelm.prompts.layered import ContextChunk, LayeredPrompt
from servelm.rag.reranker import Hit

SYSTEM = ("You answer questions using only the numbered documents provided. After each fact, cite the "
          "document it comes from as [n], where n is the document's index. If the documents do not "
          "contain the answer, say that they do not.")
NO_ANSWER = "The documents do not contain an answer to this question."
Render = Callable[[list[ContextChunk]], list[dict]]
_CITE_RE = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def build_messages(question: str, hits: list[Hit], count_tokens: Callable[[list[dict]], int],
                   context_window: int, reserve: int, history: list[dict] | None = None,
                   system: str = SYSTEM, render: Render | None = None) -> tuple[list[dict], list[Hit]]:
    """Return ``(messages, used_hits)``: the best hits that fit in ``context_window - reserve``.

    ``count_tokens(messages)`` counts the rendered prompt in the answering model's tokens.
    ``render(context)`` builds the messages around the numbered chunks; by default the layered prompt
    (``system`` → context → ``question``, after ``history``); a prompt strategy passes its own, so its
    instructions and examples stay (system → examples → context → question).
    Hits are tried best first; one that does not fit is skipped so a smaller one may.
    Raises ValueError if even the question alone does not fit.
    """
    if render is None:
        def render(context: list[ContextChunk]) -> list[dict]:
            return LayeredPrompt(system=system, question=question, history=list(history or []),
                                 context=context).to_messages()
    budget = context_window - reserve
    if count_tokens(render([])) > budget:
        raise ValueError(f"the question alone does not fit the context window ({context_window} tokens, "
                         f"{reserve} kept for the answer); shorten it")
    context: list[ContextChunk] = []
    used: list[Hit] = []
    for h in hits:
        trial = context + [ContextChunk(len(used) + 1, h.chunk.text, h.chunk.source, h.chunk.page)]
        if count_tokens(render(trial)) <= budget:
            context, used = trial, used + [h]
    return render(context), used


def source_of(n: int, h: Hit) -> dict:
    """Return the source dict of context chunk ``n`` (1-based)."""
    c = h.chunk
    a, b = h.snippet
    return {"index": n, "source": c.source, "page": c.page, "start": c.start, "end": c.end,
            "snippet": c.text[a:b], "score": round(float(h.relevance), 4), "chunk_id": c.id}


def cited_sources(answer: str, used: list[Hit]) -> list[dict]:
    """Return the sources the answer cites as ``[n]`` (first citation first).

    Numbers outside ``1..len(used)`` are ignored (a model may invent them). If the answer cites
    nothing, every context chunk is returned: the answer was still generated from them.
    """
    order: list[int] = []
    for m in _CITE_RE.finditer(answer):
        for part in m.group(1).split(","):
            n = int(part)
            if 1 <= n <= len(used) and n not in order:
                order.append(n)
    if not order:
        order = list(range(1, len(used) + 1))
    return [source_of(n, used[n - 1]) for n in order]
