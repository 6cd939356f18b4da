"""The streaming loop chat and completions share: engine outputs → per-choice chunks → SSE events.

Each route says how one choice's output becomes a chunk choice (its stream stages, logprobs, finish
reason); this loop does the rest the same way for both: skips empty outputs, stops a choice once it
finished or a guard ended it, stops the engine when every choice ended, adds the usage chunk, turns a
failure into an error event (the headers are gone by then) and always releases the request.
"""
from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

from servelm.server import sse
from servelm.server.errors import APIError
from servelm.server.schemas import Usage
from servelm.server.serving import Generation

log = logging.getLogger("servelm.server")

# (engine output of one choice) -> (the chunk choice to send or None to send nothing now, whether a guard ended it)
ChoiceStep = Callable[[object], Awaitable[tuple[object | None, bool]]]


async def stream_events(gen: Generation, n: int, step: ChoiceStep, chunk: Callable[..., bytes],
                        include_usage: bool, head: list[bytes] = (),
                        tail: Callable[[], list[bytes]] = list) -> AsyncIterator[bytes]:
    """Yields the SSE events of a streamed generation of ``n`` choices, ending with ``data: [DONE]``.

    ``chunk(choices, usage=None)`` frames one event; ``head`` is sent first, ``tail()`` after the last
    choice ended (before the usage chunk).
    """
    done: set[int] = set()
    try:
        for event in head:
            yield event
        async with aclosing(gen.outputs()) as outputs:
            async for out in outputs:
                choices = []
                for c in out.outputs:
                    if c.index in done or (not c.delta_text and not c.finished and not c.delta_logprobs):
                        continue
                    choice, ended = await step(c)
                    if c.finished or ended:
                        done.add(c.index)
                    if choice is not None:
                        choices.append(choice)
                if choices:
                    yield chunk(choices)
                if len(done) == n:
                    break  # every choice ended (possibly filtered early): closing the stream aborts the rest
        for event in tail():
            yield event
        if include_usage:
            yield chunk([], Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                                  total_tokens=gen.prompt_tokens + gen.completion_tokens))
    except APIError as e:  # headers are gone; tell the client in the stream (the SDK raises on it)
        gen.info["error"] = e.code
        yield sse.error_event(e.body())
    except Exception as e:  # e.g. the engine died mid-stream: end the stream with an error, not a cut
        log.exception("stream failed", extra={"request_id": gen.request_id})
        gen.info["error"] = type(e).__name__
        yield sse.error_event(APIError(503, "Generation failed inside the engine; retry.",
                                       code="engine_error").body())
    finally:
        await gen.finish()  # also when the client left before the first token
    yield sse.DONE
