"""Engine logprobs -> the two OpenAI shapes (chat's ``content`` list, completions' parallel arrays)."""
from __future__ import annotations

from servelm.engine import TokenLogprobs
from servelm.server.schemas import ChatTokenLogprob, ChoiceLogprobs, CompletionLogprobs, TopLogprob


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(items: list[TokenLogprobs], k: int) -> ChoiceLogprobs:
    """Returns chat-style logprobs with the ``k`` best alternatives per token."""
    content = []
    for t in items:
        top = [TopLogprob(token=a.decoded, logprob=a.logprob, bytes=_bytes(a.decoded)) for a in t.top[:k]]
        content.append(ChatTokenLogprob(token=t.chosen.decoded, logprob=t.chosen.logprob,
                                        bytes=_bytes(t.chosen.decoded), top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(items: list[TokenLogprobs], k: int, offset: int = 0) -> CompletionLogprobs:
    """Returns completions-style logprobs; ``offset`` is the text offset of the first token."""
    out = CompletionLogprobs()
    for t in items:
        out.tokens.append(t.chosen.decoded)
        out.token_logprobs.append(t.chosen.logprob)
        out.top_logprobs.append({a.decoded: a.logprob for a in t.top[:k]} if k else None)
        out.text_offset.append(offset)
        offset += len(t.chosen.decoded)
    return out
