"""POST /generate: the seed project's simple endpoint, kept for its users."""
from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Depends, Request, Response

from servelm.engine import SamplingParams
from servelm.server.auth import Principal, require
from servelm.server.context import get_context
from servelm.server.schemas import GenerateRequest, GenerateResponse
from servelm.server.serving import start, until_disconnect

router = APIRouter(tags=["simple"])


@router.post("/generate", response_model=GenerateResponse, summary="Generate text from a prompt")
async def generate(body: GenerateRequest, request: Request, response: Response,
                   principal: Principal = Depends(require("chat"))):
    """Returns ``{text, tokens_generated}`` for a raw prompt (no chat template)."""
    ctx = get_context(request)
    if ctx.settings.log_prompts:
        request.scope["servelm"]["prompt"] = body.prompt
    ids = ctx.engine.tokenizer.encode(body.prompt, add_special_tokens=True)
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature)
    gen = await start(ctx, request, principal, ids, params, prompt_param="prompt")
    response.headers.update(gen.rate_headers)

    async def collect() -> str:
        text = ""
        async with aclosing(gen.outputs()) as outputs:
            async for out in outputs:
                text = out.outputs[0].text
        return text

    text = await until_disconnect(request, collect())
    return GenerateResponse(text=text, tokens_generated=gen.completion_tokens)
