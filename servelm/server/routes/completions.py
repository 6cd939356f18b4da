"""POST /v1/completions: OpenAI (legacy) text completions, streaming and not."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from servelm.server import sse
from servelm.server.auth import Principal, require
from servelm.server.context import ServerContext, get_context
from servelm.server.errors import invalid
from servelm.server.logprobs import completion_logprobs
from servelm.server.schemas import Completion, CompletionChoice, CompletionRequest, Usage
from servelm.safety import FallbackResult
from servelm.server.guarding import call_engine, fallback_headers
from servelm.server.pipeline import run_stream_stages
from servelm.server.serving import Generation, check_context, sampling_params, start, until_disconnect
from servelm.server.streaming import stream_events

router = APIRouter(tags=["openai"])


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
    rid_req = request.scope["servelm"]["request_id"]
    g = ctx.guarding
    rid = "cmpl-" + uuid.uuid4().hex
    params = sampling_params(body, body.max_tokens, body.logprobs, getattr(ctx.engine.tokenizer, "vocab_size", None))
    # a prompt the model cannot take gets its precise 400 before any scanning
    check_context(ctx, len(prompt_ids), params.max_tokens, "prompt")
    held = await g.check_prompt(prompt_text, rid_req, principal.name) if g is not None else None
    if held is not None:
        headers = {"x-servelm-review-id": held.servelm["review_id"]}
        return _without_engine(ctx, rid, body, held.text, "content_filter", held.servelm, headers)
    echo = prompt_text if body.echo else ""

    async def run_stream():
        return await start(ctx, request, principal, prompt_ids, params, prompt_param="prompt")

    async def run_collect():
        gen = await run_stream()
        return gen, await until_disconnect(request, _collect(gen, body, echo))

    if body.stream:
        gen = await call_engine(g, rid_req, run_stream)
        if isinstance(gen, FallbackResult):
            return _fallback(ctx, rid, body, gen, request.scope["servelm"])
        response.headers.update(gen.rate_headers)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        scanners = {i: g.stream_scanner(rid_req, principal.name, prompt_text) if g is not None else None
                    for i in range(body.n)}
        return sse.EventStream(headers=gen.rate_headers,
                               content=_stream(ctx, gen, body, rid, echo, include_usage, scanners))
    result = await call_engine(g, rid_req, run_collect)
    if isinstance(result, FallbackResult):
        return _fallback(ctx, rid, body, result, request.scope["servelm"])
    gen, choices = result
    response.headers.update(gen.rate_headers)
    if g is not None:
        for c in choices:
            raw = c.text[len(echo):]
            a = await g.scan_output(raw, rid_req, principal.name, prompt_text)
            if a.text != raw or a.finish_reason:
                c.logprobs = None  # token logprobs would give the redacted text away
            c.text, c.servelm = echo + a.text, a.servelm or None
            c.finish_reason = a.finish_reason or c.finish_reason
    return Completion(id=rid, model=ctx.model_name, choices=choices,
                      usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                                  total_tokens=gen.prompt_tokens + gen.completion_tokens))


def _without_engine(ctx: ServerContext, rid: str, body: CompletionRequest, text: str, reason: str, note: dict,
                    headers: dict):
    """Returns a one-choice completion the engine did not write (held for review, or a fallback)."""
    out = Completion(id=rid, model=ctx.model_name, servelm=note, usage=Usage(prompt_tokens=0, total_tokens=0),
                     choices=[CompletionChoice(index=0, text=text, finish_reason=reason)])
    if body.stream:
        async def events():
            yield sse.event(out)
            yield sse.DONE

        return sse.EventStream(headers=headers, content=events())
    return JSONResponse(out.model_dump(exclude_none=True), headers=headers)


def _fallback(ctx: ServerContext, rid: str, body: CompletionRequest, r: FallbackResult, info: dict):
    info["fallback"] = r.kind
    return _without_engine(ctx, rid, body, r.text, "stop", {"fallback": {"kind": r.kind, "reason": r.reason}},
                           fallback_headers(r))


async def _collect(gen: Generation, body: CompletionRequest, echo: str) -> list[CompletionChoice]:
    last = await gen.final()
    choices = []
    for c in sorted(last.outputs, key=lambda c: c.index):
        lp = None
        if body.logprobs is not None:
            lp = completion_logprobs(c.logprobs or [], body.logprobs, len(echo))
        choices.append(CompletionChoice(index=c.index, text=echo + c.text, logprobs=lp,
                                        finish_reason="stop" if c.finish_reason == "abort" else c.finish_reason))
    return choices


def _stream(ctx: ServerContext, gen: Generation, body: CompletionRequest, rid: str, echo: str,
            include_usage: bool, scanners: dict):
    created = int(time.time())

    def chunk(choices, usage=None) -> bytes:
        return sse.event(Completion(id=rid, created=created, model=ctx.model_name, choices=choices, usage=usage))

    offsets = {i: len(echo) for i in range(body.n)}

    async def step(c):
        lp, ended = None, False
        text, note = c.delta_text, None
        reason = "stop" if c.finish_reason == "abort" else c.finish_reason
        scanner = scanners.get(c.index)
        if scanner is not None:
            text = await run_stream_stages([scanner], text, c.finished)
            if scanner.finish_reason:  # a guard ended this choice
                ended, reason, note = True, scanner.finish_reason, scanner.servelm
        elif body.logprobs is not None and c.delta_logprobs:
            # logprobs only unguarded: a guard holds text back, so token offsets would not match
            lp = completion_logprobs(c.delta_logprobs, body.logprobs, offsets[c.index])
        offsets[c.index] += len(text)
        if not text and lp is None and reason is None:
            return None, ended  # a guard is holding this text back: no empty chunk
        return CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=reason, servelm=note), ended

    head = [chunk([CompletionChoice(index=i, text=echo) for i in range(body.n)])] if echo else []
    return stream_events(gen, body.n, step, chunk, include_usage, head)
