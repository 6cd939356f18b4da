"""RAG inside the server: the ``RagService`` the routes use and the engine-backed ``generate`` it answers
with (through the server's admission and rate limits). The chat stages for the ``rag`` field are in
:mod:`servelm.serving.rag`.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

from fastapi import Request

from servelm.engine import SamplingParams
from servelm.server.auth import Principal
from servelm.server.serving import start
from servelm.server.settings import ServerSettings

log = logging.getLogger("servelm.server")


def build_service(settings: ServerSettings, engine):
    """Returns a ``servelm.rag.RagService`` for ``settings`` (loads the embedding model; blocking).

    Raises ValueError/FileNotFoundError/RuntimeError for bad RAG settings (e.g. an unreachable --pg-url).
    """
    from servelm.rag.config import RagConfig
    from servelm.rag.service import RagService

    # embed_threads stays 0: RagConfig applies it with torch.set_num_threads, which is process-wide
    # and would lower the engine's threads in this process.
    cfg = RagConfig(data_dir=settings.rag_dir, max_file_bytes=settings.rag_max_file_bytes,
                    store="pgvector" if settings.pg_url else "faiss", pg_dsn=settings.pg_url or "",
                    embed_threads=0)

    def count_tokens(messages: list[dict]) -> int:
        # Counted in the answering model's tokens, with its chat template (the engine is started by then).
        tok = engine.tokenizer
        return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False))

    return RagService(cfg, count_tokens=count_tokens)


def engine_generate(ctx, request: Request, principal: Principal, max_tokens: int | None,
                    temperature: float | None, param: str = "query", on_start=None):
    """Returns ``generate(messages) -> AsyncIterator[str]`` answering through the server's admission,
    rate limits and metrics (as a chat request of ``principal``); ``on_start()`` runs when it is called
    (retrieval is over: the RAG lane's place is given back)."""

    async def generate(messages: list[dict]):
        if on_start is not None:
            on_start()
        tok = ctx.engine.tokenizer
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        limit = max_tokens or ctx.rag.cfg.answer_reserve_tokens
        params = SamplingParams(max_tokens=limit, temperature=0.0 if temperature is None else temperature)
        gen = await start(ctx, request, principal, ids, params, prompt_param=param)
        async with aclosing(gen.outputs()) as outputs:
            async for out in outputs:
                yield out.outputs[0].delta_text

    return generate


async def load(ctx) -> None:
    """Builds ``ctx.rag`` in a thread when RAG is on (so it loads alongside the engine)."""
    if ctx.settings.rag:
        ctx.rag = await asyncio.to_thread(build_service, ctx.settings, ctx.engine)
        if ctx.guarding is not None and ctx.guarding.guard is not None:
            ctx.rag.screen = ctx.guarding.screen_documents
        log.info("rag ready", extra={"rag_dir": ctx.settings.rag_dir,
                                     "rag_store": "pgvector" if ctx.settings.pg_url else "faiss"})
