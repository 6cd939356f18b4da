"""POST /v1/embeddings: OpenAI embeddings from the configured sentence-transformers model."""
from __future__ import annotations

import base64
import struct

from fastapi import APIRouter, Depends, Request

from servelm.server.auth import Principal, require
from servelm.server.context import get_context
from servelm.server.embedder import MAX_INPUTS, Embedder
from servelm.server.errors import APIError, invalid
from servelm.server.schemas import Embedding, EmbeddingRequest, EmbeddingResponse, Usage
from servelm.server.serving import rate_limit

router = APIRouter(tags=["openai"])


@router.post("/v1/embeddings", response_model=EmbeddingResponse, summary="Embed texts")
async def create_embeddings(body: EmbeddingRequest, request: Request,
                            principal: Principal = Depends(require("embeddings"))):
    """Returns one embedding per input (a text or a list of token ids), in input order.

    The key's rate limits count the request and its tokens; then it waits its turn for the embedding model
    (429 beyond the key's share of the queue, 503 with Retry-After when the queue is full or the wait
    would pass the server's wait bound)."""
    ctx = get_context(request)
    emb = ctx.embedder
    if emb is None:
        raise APIError(404, "This server has no embedding model configured.", param="model",
                       code="model_not_found")
    if body.model is not None and body.model != emb.name:
        raise APIError(404, f"The embedding model '{body.model}' does not exist; use '{emb.name}'.",
                       param="model", code="model_not_found")
    inputs = _token_lists(emb, body)
    tokens = sum(map(len, inputs))
    await ctx.limiter.settle(await rate_limit(ctx, principal, tokens), tokens)
    async with ctx.admission.lanes["embeddings"].slot(principal.name):
        vectors = await emb.embed(inputs)
    ctx.metrics.embedding_tokens.inc(tokens)
    request.scope["servelm"]["prompt_tokens"] = tokens
    data = [Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=emb.name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


def _token_lists(emb: Embedder, body: EmbeddingRequest) -> list[list[int]]:
    """Returns the id list the model reads for each input: texts tokenized, id lists checked against the
    vocabulary and wrapped in the special tokens a text gets, then each checked against (or, when the
    request asks, truncated to) the model's window. Raises APIError(400) naming the input."""
    given = body.input
    items = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else given
    if not items:
        raise invalid("input must not be empty.", "input", "invalid_value")
    if len(items) > MAX_INPUTS:
        raise invalid(f"At most {MAX_INPUTS} inputs per request, got {len(items)}.", "input", "invalid_value")
    if body.dimensions is not None and body.dimensions != emb.dim:
        raise invalid(f"This model returns {emb.dim} dimensions; dimensions={body.dimensions} is not supported.",
                      "dimensions", "invalid_value")
    limit, keep = emb.max_tokens, None
    if body.truncate_prompt_tokens is not None:
        k = body.truncate_prompt_tokens
        low = len(emb.prefix) + len(emb.suffix) + 1  # the special tokens and one token of text
        if k != -1 and not low <= k <= emb.max_tokens:
            raise invalid(f"truncate_prompt_tokens must be -1 (the model's limit) or {low}..{emb.max_tokens}, "
                          f"got {k}.", "truncate_prompt_tokens", "invalid_value")
        limit, keep = (emb.max_tokens if k == -1 else k), "last"
    elif body.truncate:
        keep = "first"
    out = []
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 and items is not given else f"input[{i}]"
        if isinstance(item, str):
            if not item.strip():
                raise invalid(f"{where} is empty.", "input", "invalid_value")
            ids = emb.tokenize(item)
        else:
            if not item:
                raise invalid(f"{where} is an empty list of token ids.", "input", "invalid_value")
            bad = next((t for t in item if not 0 <= t < emb.vocab_size), None)
            if bad is not None:
                raise invalid(f"{where} holds token id {bad}, outside the vocabulary of '{emb.name}' (0 to "
                              f"{emb.vocab_size - 1}). Token ids must come from the embedding model's own tokenizer; "
                              "LangChain's OpenAIEmbeddings sends tiktoken ids unless check_embedding_ctx_length=False.",
                              "input", "invalid_value")
            ids = emb.wrap(item)
        if keep is not None:
            ids = emb.truncate(ids, limit, keep)
        elif len(ids) > limit:
            raise invalid(f"{where} has {len(ids)} tokens; the embedding model '{emb.name}' reads at most {limit}. "
                          "Shorten it, or set truncate_prompt_tokens (vLLM: keeps the last tokens) or "
                          "truncate: true (TEI: keeps the first).", "input", "context_length_exceeded")
        out.append(ids)
    return out


def _encode(vec: list[float], fmt: str | None) -> list[float] | str:
    if fmt == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
    return vec
