"""POST /generate: the seed project's simple endpoint, kept for its users.

A raw prompt (no chat template) and the common sampling fields; ``{text, tokens_generated,
finish_reason}`` back, or with ``stream: true`` server-sent events of ``{"text": delta}`` whose last one
also carries ``finish_reason`` and ``tokens_generated``, then ``data: [DONE]``. Guarded like completions.
"""
from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from servelm.engine import InvalidRequestError, SamplingParams
from servelm.safety import FallbackResult
from servelm.server import sse
from servelm.server.auth import Principal, require
from servelm.server.context import ServerContext, get_context
from servelm.server.errors import from_engine
from servelm.serving.guard import call_engine, fallback_headers
from servelm.serving.pipeline import run_stream_stages
from servelm.server.schemas import GenerateRequest, GenerateResponse
from servelm.server.serving import Generation, check_context, client_finish_reason, start, until_disconnect
from servelm.server.streaming import stream_events
from servelm.serving.sampling import clamp_top_k, fold_seed

router = APIRouter(tags=["simple"])


def _params(ctx: ServerContext, body: GenerateRequest) -> SamplingParams:
    """The engine's SamplingParams for ``body``; raises APIError(400) naming a field the engine refuses."""
    vocab = ctx.engine.tokenizer.vocab_size
    try:
        return SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=clamp_top_k(body.top_k, vocab), stop=body.stop, seed=fold_seed(body.seed),
                              repetition_penalty=body.repetition_penalty)
    except InvalidRequestError as e:
        raise from_engine(e) from None


@router.post("/generate", response_model=GenerateResponse, summary="Generate text from a prompt")
async def generate(body: GenerateRequest, request: Request, response: Response,
                   principal: Principal = Depends(require("chat"))):
    """Returns ``{text, tokens_generated, finish_reason}`` for a raw prompt (no chat template), or an SSE
    stream with ``stream: true``. A blocked output comes back as empty text, ``finish_reason: content_filter``.
    """
    ctx = get_context(request)
    if ctx.settings.log_prompts:
        request.scope["servelm"]["prompt"] = body.prompt
    rid = request.scope["servelm"]["request_id"]
    g = ctx.guarding
    ids = ctx.engine.tokenizer.encode(body.prompt, add_special_tokens=True)
    params = _params(ctx, body)
    check_context(ctx, len(ids), params.max_tokens, "prompt")
    held = await g.check_prompt(body.prompt, rid, principal.name, markers=ctx.special_tokens) if g is not None else None
    if held is not None:  # held for human review: GET /v1/reviews/{id} gives the answer once approved
        return _fixed(body, {"text": held.text, "tokens_generated": 0, "finish_reason": "content_filter",
                             "servelm": held.servelm}, {"x-servelm-review-id": held.servelm["review_id"]})

    async def run_stream() -> Generation:
        gen = await start(ctx, request, principal, ids, params, prompt_param="prompt")
        response.headers.update(gen.rate_headers)
        return gen

    async def run():
        gen = await run_stream()

        async def collect() -> tuple[str, str | None]:
            text, reason = "", None
            async with aclosing(gen.outputs()) as outputs:
                async for out in outputs:
                    text, reason = out.outputs[0].text, client_finish_reason(out.outputs[0].finish_reason)
            return text, reason

        return gen, await until_disconnect(request, collect())

    result = await call_engine(g, rid, run_stream if body.stream else run)
    if isinstance(result, FallbackResult):
        request.scope["servelm"]["fallback"] = result.kind
        return _fixed(body, {"text": result.text, "tokens_generated": 0, "finish_reason": "stop",
                             "servelm": {"fallback": {"kind": result.kind, "reason": result.reason}}},
                      fallback_headers(result))
    if body.stream:
        return sse.EventStream(headers=result.rate_headers, content=_stream(ctx, result, rid, principal.name,
                                                                            body.prompt))
    gen, (text, reason) = result
    note = None
    if g is not None:
        scanned = await g.scan_output(text, rid, principal.name, body.prompt)
        text, reason, note = scanned.text, scanned.finish_reason or reason, scanned.servelm or None
    return GenerateResponse(text=text, tokens_generated=gen.completion_tokens, finish_reason=reason, servelm=note)


def _fixed(body: GenerateRequest, answer: dict, headers: dict[str, str]):
    """An answer the engine did not write (held for review, or a fallback), as JSON or as a one-event stream."""
    if not body.stream:
        return JSONResponse(answer, headers=headers)

    async def events():
        yield sse.event(answer)
        yield sse.DONE

    return sse.EventStream(events(), headers=headers)


def _stream(ctx: ServerContext, gen: Generation, request_id: str, key_name: str, prompt: str):
    """The SSE events of one streamed generation, through the output guard when there is one."""
    g = ctx.guarding
    scanner = g.stream_scanner(request_id, key_name, prompt) if g is not None and g.guard is not None else None

    async def step(_, c):
        text, reason, ended = c.delta_text, client_finish_reason(c.finish_reason), False
        note = None
        if scanner is not None:
            text = await run_stream_stages([scanner], text, c.finished)
            if scanner.finish_reason:  # the guard ended the answer
                ended, reason = True, scanner.finish_reason
            note = scanner.servelm  # what the guard changed or held, in the last event
        if reason is not None:
            last = {"text": text, "finish_reason": reason, "tokens_generated": gen.completion_tokens}
            return (last | {"servelm": note} if note else last), ended
        return ({"text": text} if text else None), ended  # nothing while the guard holds text back

    return stream_events([gen], 1, step, lambda choices, usage=None: sse.event(choices[0]), False)
