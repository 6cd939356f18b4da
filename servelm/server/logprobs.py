"""Engine logprobs -> the two OpenAI shapes (chat's ``content`` list, completions' parallel arrays).

``bytes`` are each token's raw bytes from the tokenizer: a token that is part of a UTF-8 character
(an emoji split over three tokens) decodes alone to U+FFFD, but its bytes joined with its neighbours'
give the text back, which is what the field is for.
"""
from __future__ import annotations

import codecs

from servelm.engine import TokenLogprobs
from servelm.server.schemas import (ChatTokenLogprob, ChoiceLogprobs, CompletionLogprobs, PromptLogprob,
                                    PromptLogprobs, TopLogprob)


def chat_logprobs(items: list[TokenLogprobs], k: int) -> ChoiceLogprobs:
    """Returns chat-style logprobs with the ``k`` best alternatives per token."""
    content = []
    for t in items:
        top = [TopLogprob(token=a.decoded, logprob=a.logprob, bytes=list(a.token_bytes)) for a in t.top[:k]]
        content.append(ChatTokenLogprob(token=t.chosen.decoded, logprob=t.chosen.logprob,
                                        bytes=list(t.chosen.token_bytes), top_logprobs=top))
    return ChoiceLogprobs(content=content)


class TextOffsets:
    """Character offsets of a choice's tokens in its text: a token that ends inside a UTF-8 character
    adds no character until the character is complete, as the text the client gets."""

    def __init__(self, start: int = 0):
        self.offset = start
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token_bytes: bytes) -> int:
        """Returns the offset where the token starts and moves past it."""
        at = self.offset
        self.offset += len(self._utf8.decode(token_bytes))
        return at


def prompt_completion_logprobs(prompt_ids: list[int], items: list[TokenLogprobs | None], k: int,
                               tokenizer) -> CompletionLogprobs:
    """Completions-style logprobs of the prompt's tokens (``echo``): the first token has none (nothing
    predicts it), as in OpenAI's and vLLM's answers; offsets count from the start of the echoed text."""
    out, offsets = CompletionLogprobs(), TextOffsets(0)
    first = prompt_ids[0]
    out.tokens.append(tokenizer.decode([first], skip_special_tokens=False))
    out.token_logprobs.append(None)
    out.top_logprobs.append(None)
    out.text_offset.append(offsets.advance(tokenizer.token_bytes(first)))
    return completion_logprobs([t for t in items[1:] if t is not None], k, offsets, into=out)


def completion_logprobs(items: list[TokenLogprobs], k: int, offsets: TextOffsets,
                        into: CompletionLogprobs | None = None) -> CompletionLogprobs:
    """Returns completions-style logprobs (appended to ``into`` when given); ``offsets`` continues from
    the choice's previous tokens."""
    out = into if into is not None else CompletionLogprobs()
    for t in items:
        out.tokens.append(t.chosen.decoded)
        out.token_logprobs.append(t.chosen.logprob)
        out.top_logprobs.append({a.decoded: a.logprob for a in t.top[:k]} if k else None)
        out.text_offset.append(offsets.advance(t.chosen.token_bytes))
    return out


def vllm_prompt_logprobs(items: list[TokenLogprobs | None], k: int) -> PromptLogprobs:
    """Returns vLLM's ``prompt_logprobs``: per prompt token ``{token_id: {logprob, rank, decoded_token}}`` of the
    token itself and its ``k`` most likely alternatives (None for the first token)."""
    out = []
    for t in items:
        if t is None:
            out.append(None)
            continue
        top = t.top[:k]
        rank = next((a.rank for a in t.top if a.token_id == t.chosen.token_id), None)
        entry = {t.chosen.token_id: PromptLogprob(logprob=t.chosen.logprob, rank=rank, decoded_token=t.chosen.decoded)}
        entry.update((a.token_id, PromptLogprob(logprob=a.logprob, rank=a.rank, decoded_token=a.decoded)) for a in top)
        out.append(entry)
    return out
