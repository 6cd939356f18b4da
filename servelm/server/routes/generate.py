"""POST /generate: the seed project's simple endpoint, kept for its users."""
from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from servelm.engine import SamplingParams
from servelm.safety import FallbackResult
from servelm.server.auth import Principal, require
from servelm.server.context import get_context
from servelm.server.schemas import GenerateRequest, GenerateResponse
from servelm.server.guarding import call_engine, fallback_headers
from servelm.server.serving import check_context, start, until_disconnect

router = APIRouter(tags=["simple"])


@router.post("/generate", response_model=GenerateResponse, summary="Generate text from a prompt")
async def generate(body: GenerateRequest, request: Request, response: Response,
                   principal: Principal = Depends(require("chat"))):
    """Returns ``{text, tokens_generated}`` for a raw prompt (no chat template), guarded like completions.

    A blocked output comes back as empty text (the simple API has no finish reason).
    """
    ctx = get_context(request)
    if ctx.settings.log_prompts:
        request.scope["servelm"]["prompt"] = body.prompt
    rid = request.scope["servelm"]["request_id"]
    g = ctx.guarding
    ids = ctx.engine.tokenizer.encode(body.prompt, add_special_tokens=True)
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature)
    check_context(ctx, len(ids), params.max_tokens, "prompt")
    held = await g.check_prompt(body.prompt, rid, principal.name, markers=ctx.special_tokens) if g is not None else None
    if held is not None:  # held for human review: GET /v1/reviews/{id} gives the answer once approved
        return JSONResponse({"text": held.text, "tokens_generated": 0, "servelm": held.servelm},
                            headers={"x-servelm-review-id": held.servelm["review_id"]})

    async def run():
        gen = await start(ctx, request, principal, ids, params, prompt_param="prompt")
        response.headers.update(gen.rate_headers)

        async def collect() -> str:
            text = ""
            async with aclosing(gen.outputs()) as outputs:
                async for out in outputs:
                    text = out.outputs[0].text
            return text

        return gen, await until_disconnect(request, collect())

    result = await call_engine(g, rid, run)
    if isinstance(result, FallbackResult):
        request.scope["servelm"]["fallback"] = result.kind
        return JSONResponse({"text": result.text, "tokens_generated": 0,
                             "servelm": {"fallback": {"kind": result.kind, "reason": result.reason}}},
                            headers=fallback_headers(result))
    gen, text = result
    if g is not None:
        text = (await g.scan_output(text, rid, principal.name, body.prompt)).text
    return GenerateResponse(text=text, tokens_generated=gen.completion_tokens)
