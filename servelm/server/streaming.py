"""The streaming loop chat and completions share: engine outputs → per-choice chunks → SSE events.

A request may run several engine requests (a completions batch: one per prompt, ``n`` choices each);
their outputs are merged as they come and choice ``j`` of prompt ``i`` is sent as index ``i * n + j``.

Each route says how one choice's output becomes a chunk choice (its stream stages, logprobs, finish
reason); this loop does the rest the same way for both: skips empty outputs, stops a choice once it
finished or a guard ended it, stops the engine when every choice ended, adds the usage chunk, turns a
failure into an error event (the headers are gone by then) and always releases the request.
"""
from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, Callable

from servelm.engine import RequestFailedError
from servelm.server import sse
from servelm.server.errors import APIError, request_failed
from servelm.server.schemas import Usage
from servelm.server.serving import Generation, finish_all, merged_outputs

log = logging.getLogger("servelm.server")

# (choice index in the response, engine output of that choice) -> (the chunk choice to send or None to send
# nothing now, whether a guard ended it)
ChoiceStep = Callable[[int, object], Awaitable[tuple[object | None, bool]]]


async def stream_events(gens: list[Generation], n: int, step: ChoiceStep, chunk: Callable[..., bytes],
                        include_usage: bool, head: list[bytes] = (),
                        tail: Callable[[], list[bytes]] = list) -> AsyncIterator[bytes]:
    """Yields the SSE events of streamed generations of ``n`` choices each, ending with ``data: [DONE]``.

    ``chunk(choices, usage=None)`` frames one event (of one choice: clients that read ``choices[0]`` miss
    nothing); ``head`` is sent first, ``tail()`` after the last choice ended (before the usage chunk).
    """
    done: set[int] = set()
    try:
        for event in head:
            yield event
        async with aclosing(merged_outputs(gens)) as outputs:
            async for i, out in outputs:
                choices = []
                for c in out.outputs:
                    index = i * n + c.index
                    if index in done or (not c.delta_text and not c.finished and not c.delta_logprobs):
                        continue
                    choice, ended = await step(index, c)
                    if c.finished or ended:
                        done.add(index)
                    if choice is not None:
                        choices.append(choice)
                for choice in choices:  # one choice per chunk, as OpenAI and vLLM send them
                    yield chunk([choice])
                if len(done) == n * len(gens):
                    break  # every choice ended (possibly filtered early): closing the streams aborts the rest
        for event in tail():
            yield event
        if include_usage:
            yield chunk([], usage(gens))
    except APIError as e:  # headers are gone; tell the client in the stream (the SDK raises on it)
        _note_error(gens, e.code)
        yield sse.error_event(e.body())
    except RequestFailedError as e:  # the engine failed this request alone and serves the others
        log.warning("request failed in the engine: %s", e, extra={"request_id": gens[0].request_id})
        _note_error(gens, "request_failed")
        yield sse.error_event(request_failed(e).body())
    except Exception as e:  # e.g. the engine died mid-stream: end the stream with an error, not a cut
        log.exception("stream failed", extra={"request_id": gens[0].request_id})
        _note_error(gens, type(e).__name__)
        yield sse.error_event(APIError(503, "Generation failed inside the engine; retry.",
                                       code="engine_error").body())
    finally:
        await finish_all(gens)  # also when the client left before the first token
    yield sse.DONE


def usage(gens: list[Generation]) -> Usage:
    """Returns the token usage of a request's generations together."""
    prompt = sum(g.prompt_tokens for g in gens)
    completion = sum(g.completion_tokens for g in gens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _note_error(gens: list[Generation], code: str | None) -> None:
    if gens:  # they share the request's access-log fields
        gens[0].info["error"] = code
