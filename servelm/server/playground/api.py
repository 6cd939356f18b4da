"""Read-only routes the playground needs (any client may use them; they are in the OpenAPI docs).

- ``GET /v1/me``: the calling key's name and scopes, and which optional parts this server runs, so a
  client shows admin tools only to admin keys and "not enabled" states instead of broken ones.
- ``POST /v1/prompts/render``: the prompt a chat request would send the model under a strategy,
  rendered through the model's chat template (the strategy compare view shows it).
- ``GET /v1/quantization``: weight memory per format for the served model, computed from its layer
  shapes, and the loaded model's measured weight bytes.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from servelm.server.auth import Principal, require
from servelm.server.context import get_context
from servelm.serving.pipeline import ChatTurn
from servelm.server.routes.chat import render_prompt, turn_messages
from servelm.server.schemas import ChatMessage, FewShotExample, _Request

router = APIRouter(tags=["playground"])
ANY_KEY = require("chat", "embeddings", "models", "rag")


class PromptRender(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    strategy: str | None = Field(None, description="zero_shot, few_shot or chain_of_thought; none: as sent.")
    examples: list[FewShotExample] | None = Field(None, max_length=32, description="few_shot: demonstrations.")


@router.get("/v1/me", summary="The calling key's name and scopes, and the server's optional features")
async def me(request: Request, principal: Principal = Depends(ANY_KEY)) -> dict:
    """Returns ``{name, scopes, admin, features: {rag, review, strategies, default_strategy}}``."""
    from servelm.prompts import strategy_names

    ctx = get_context(request)
    g = ctx.guarding
    review = g is not None and g.guard is not None and g.guard.review_queue is not None
    return {"object": "key", "name": principal.name, "scopes": list(principal.scopes),
            "admin": principal.allows("admin"), "model": ctx.model_name,
            "features": {"rag": ctx.rag is not None, "review": review, "strategies": strategy_names(),
                         "default_strategy": g.default_strategy if g is not None else None}}


@router.post("/v1/prompts/render", summary="Render the prompt a chat request would send the model")
async def render(body: PromptRender, request: Request, principal: Principal = Depends(require("chat"))) -> dict:
    """Returns ``{strategy, messages, prompt, prompt_tokens}``: the strategy's messages and the chat template's
    text. Input scanning and the policy's canary line (a secret) are not applied; nothing is generated."""
    ctx = get_context(request)
    turn = ChatTurn(messages=turn_messages(body.messages), strategy=body.strategy, rag=None,
                    key_name=principal.name, request_id=request.scope["servelm"]["request_id"])
    turn.metadata["examples"] = [e.model_dump() for e in body.examples or []]
    strategy = body.strategy
    if ctx.guarding is not None:
        await ctx.guarding.apply_strategy(turn)
        strategy = strategy or ctx.guarding.default_strategy
    tok = ctx.engine.tokenizer
    text = render_prompt(tok, turn.messages)
    return {"object": "prompt", "strategy": strategy, "messages": turn.messages, "prompt": text,
            "prompt_tokens": len(tok.encode(text, add_special_tokens=False))}


@router.get("/v1/quantization", summary="Weight memory per format for the served model")
async def quantization(request: Request, _: Principal = Depends(ANY_KEY)) -> dict:
    """Returns ``{model, params, formats: {fmt: {computed_bytes, group_size}}, loaded: {dtype, quantization,
    measured_bytes}}`` (see ``servelm quantize --report``); ``formats`` is empty when the shapes cannot be read."""
    state = request.app.state
    if getattr(state, "quantization", None) is None:  # the model does not change while the server runs
        state.quantization = await asyncio.to_thread(_figures, get_context(request))
    return state.quantization


def _figures(ctx) -> dict:
    from servelm.engine.quant import model_weight_bytes
    from servelm.engine.quant.report import ladder

    eng = ctx.engine.engine  # the LLMEngine inside the AsyncEngine
    try:
        out = ladder(ctx.settings.model)
    except (OSError, ValueError, KeyError):  # ModelLoadError is a ValueError
        out = {"params": sum(p.numel() for p in eng.model.parameters()), "formats": {}}
    loaded = {"dtype": str(eng.dtype).removeprefix("torch."), "quantization": eng.config.quantization,
              "measured_bytes": model_weight_bytes(eng.model)}
    report = getattr(eng, "quant_report", None)
    if report is not None:
        loaded["report"] = {k: v for k, v in report.to_dict().items() if k != "layers"}
    return {"object": "quantization", **out, "model": ctx.model_name, "loaded": loaded}
