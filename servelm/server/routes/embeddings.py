"""POST /v1/embeddings: OpenAI embeddings from the configured sentence-transformers model."""
from __future__ import annotations

import base64
import struct

from fastapi import APIRouter, Depends, Request

from servelm.server.auth import Principal, require
from servelm.server.context import get_context
from servelm.server.embedder import MAX_INPUTS
from servelm.server.errors import APIError, invalid
from servelm.server.schemas import Embedding, EmbeddingRequest, EmbeddingResponse, Usage

router = APIRouter(tags=["openai"])


@router.post("/v1/embeddings", response_model=EmbeddingResponse, summary="Embed texts")
async def create_embeddings(body: EmbeddingRequest, request: Request,
                            principal: Principal = Depends(require("embeddings"))):
    """Returns one embedding per input text, in input order."""
    ctx = get_context(request)
    emb = ctx.embedder
    if emb is None:
        raise APIError(404, "This server has no embedding model configured.", param="model",
                       code="model_not_found")
    if body.model is not None and body.model != emb.name:
        raise APIError(404, f"The embedding model '{body.model}' does not exist; use '{emb.name}'.",
                       param="model", code="model_not_found")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise invalid("input must not be empty.", "input")
    if len(texts) > MAX_INPUTS:
        raise invalid(f"At most {MAX_INPUTS} inputs per request, got {len(texts)}.", "input")
    for i, t in enumerate(texts):
        if not t.strip():
            raise invalid(f"input[{i}] is empty.", "input")
    if body.dimensions is not None and body.dimensions != emb.dim:
        raise invalid(f"This model returns {emb.dim} dimensions; dimensions={body.dimensions} is not supported.",
                      "dimensions")
    tokens = emb.count_tokens(texts)
    await ctx.limiter.settle(await ctx.limiter.acquire(principal.name, principal.rpm, principal.tpm, tokens),
                             tokens)
    vectors = await emb.embed(texts)
    ctx.metrics.embedding_tokens.inc(tokens)
    request.scope["servelm"]["prompt_tokens"] = tokens
    data = [Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=emb.name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


def _encode(vec: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
    return vec
