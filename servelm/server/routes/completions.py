"""POST /v1/completions: OpenAI (legacy) text completions, streaming and not."""
from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request, Response

from servelm.server import sse
from servelm.server.auth import Principal, require
from servelm.server.context import ServerContext, get_context
from servelm.server.errors import APIError, invalid
from servelm.server.logprobs import completion_logprobs
from servelm.server.schemas import Completion, CompletionChoice, CompletionRequest, Usage
from servelm.server.serving import Generation, sampling_params, start, until_disconnect

router = APIRouter(tags=["openai"])
log = logging.getLogger("servelm.server")


def _prompt(ctx: ServerContext, body: CompletionRequest) -> tuple[list[int], str]:
    """Returns the prompt's token ids and its text (for echo)."""
    p = body.prompt
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise invalid("Batched prompts are not supported; send one request per prompt.", "prompt")
        p = p[0]
    tok = ctx.engine.tokenizer
    if isinstance(p, str):
        return tok.encode(p, add_special_tokens=True), p
    vocab = getattr(tok, "vocab_size", None)
    if vocab is not None and any(not 0 <= t < vocab for t in p):
        raise invalid(f"Token ids must be in [0, {vocab}).", "prompt")
    return list(p), tok.decode(list(p))


@router.post("/v1/completions", response_model=Completion, response_model_exclude_none=True,
             summary="Create a text completion (set stream=true for server-sent events)")
async def create_completion(body: CompletionRequest, request: Request, response: Response,
                            principal: Principal = Depends(require("chat"))):
    """Returns a Completion, or an SSE stream of Completion chunks ending with ``data: [DONE]``."""
    ctx = get_context(request)
    ctx.check_model(body.model)
    if body.suffix:
        raise invalid("suffix is not supported by this model.", "suffix", "unsupported_parameter")
    prompt_ids, prompt_text = _prompt(ctx, body)
    if ctx.settings.log_prompts:
        request.scope["servelm"]["prompt"] = prompt_text
    params = sampling_params(body, body.max_tokens, body.logprobs, getattr(ctx.engine.tokenizer, "vocab_size", None))
    gen = await start(ctx, request, principal, prompt_ids, params, prompt_param="prompt")
    response.headers.update(gen.rate_headers)
    rid = "cmpl-" + uuid.uuid4().hex
    echo = prompt_text if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.EventStream(headers=gen.rate_headers, content=_stream(ctx, gen, body, rid, echo, include_usage))
    choices = await until_disconnect(request, _collect(gen, body, echo))
    return Completion(id=rid, model=ctx.model_name, choices=choices,
                      usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                                  total_tokens=gen.prompt_tokens + gen.completion_tokens))


async def _collect(gen: Generation, body: CompletionRequest, echo: str) -> list[CompletionChoice]:
    last = None
    lps: dict[int, list] = {}
    async with aclosing(gen.outputs()) as outputs:
        async for out in outputs:
            last = out
            for c in out.outputs:
                if c.delta_logprobs:
                    lps.setdefault(c.index, []).extend(c.delta_logprobs)
    choices = []
    for c in sorted(last.outputs, key=lambda c: c.index):
        lp = None
        if body.logprobs is not None:
            lp = completion_logprobs(c.logprobs or lps.get(c.index, []), body.logprobs, len(echo))
        choices.append(CompletionChoice(index=c.index, text=echo + c.text, logprobs=lp,
                                        finish_reason="stop" if c.finish_reason == "abort" else c.finish_reason))
    return choices


async def _stream(ctx: ServerContext, gen: Generation, body: CompletionRequest, rid: str, echo: str,
                  include_usage: bool):
    created = int(time.time())

    def chunk(choices, usage=None) -> bytes:
        return sse.event(Completion(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage))

    done: set[int] = set()
    offsets = {i: len(echo) for i in range(body.n)}
    try:
        if echo:
            yield chunk([CompletionChoice(index=i, text=echo) for i in range(body.n)])
        async with aclosing(gen.outputs()) as outputs:
            async for out in outputs:
                choices = []
                for c in out.outputs:
                    if c.index in done or (not c.delta_text and not c.finished and not c.delta_logprobs):
                        continue
                    if c.finished:
                        done.add(c.index)
                    lp = None
                    if body.logprobs is not None and c.delta_logprobs:
                        lp = completion_logprobs(c.delta_logprobs, body.logprobs, offsets[c.index])
                    offsets[c.index] += len(c.delta_text)
                    reason = "stop" if c.finish_reason == "abort" else c.finish_reason
                    choices.append(CompletionChoice(index=c.index, text=c.delta_text, logprobs=lp,
                                                    finish_reason=reason))
                if choices:
                    yield chunk(choices)
        if include_usage:
            yield chunk([], Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                                  total_tokens=gen.prompt_tokens + gen.completion_tokens))
    except APIError as e:
        gen.info["error"] = e.code
        yield sse.error_event(e.body())
    except Exception as e:  # e.g. the engine died mid-stream: end the stream with an error, not a cut
        log.exception("stream failed", extra={"request_id": gen.request_id})
        gen.info["error"] = type(e).__name__
        yield sse.error_event(APIError(503, "Generation failed inside the engine; retry.",
                                       code="engine_error").body())
    finally:
        await gen.finish()
    yield sse.DONE
