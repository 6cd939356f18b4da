"""GET /v1/models and /v1/models/{id}: any valid key may read them (clients list models before anything else)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from servelm.server.auth import require
from servelm.server.context import get_context
from servelm.server.errors import APIError
from servelm.server.keys import SCOPES
from servelm.server.schemas import ModelCard, ModelList

router = APIRouter(tags=["openai"])
_STARTED = int(time.time())
_ANY_KEY = require("models", *SCOPES)  # vLLM's --api-key has no scopes; a chat-only key must see the models


def _cards(request: Request) -> list[ModelCard]:
    ctx = get_context(request)
    cards = [ModelCard(id=ctx.model_name, created=_STARTED, max_model_len=ctx.engine.max_model_len)]
    if ctx.embedder is not None:
        cards.append(ModelCard(id=ctx.embedder.name, created=_STARTED, max_model_len=ctx.embedder.max_tokens))
    return cards


@router.get("/v1/models", response_model=ModelList, summary="List the served models")
async def list_models(request: Request, _=Depends(_ANY_KEY)):
    """Returns the chat model and, when configured, the embedding model."""
    return ModelList(data=_cards(request))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, summary="Describe one model")
async def get_model(model_id: str, request: Request, _=Depends(_ANY_KEY)):
    """Returns the model's card; 404 when it is not served here."""
    for card in _cards(request):
        if card.id == model_id:
            return card
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
