"""The FastAPI application: ``create_app(settings, engine)`` wires routes, auth, limits and metrics."""
from __future__ import annotations

import asyncio
import importlib
import json
import logging
import shlex
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

import servelm

from servelm.server.admission import Admission, Lane
from servelm.server.context import ServerContext
from servelm.server.errors import install_handlers
from servelm.serving.guard import build_guarding
from servelm.server.keys import KeyStore, open_key_store
from servelm.server.metrics import Metrics
from servelm.server.middleware import RequestMiddleware
from servelm.serving.pipeline import RequestPipeline
from servelm.server.rate_limit import RateLimiter
from servelm.server import api_docs, playground, rag_stage
from servelm.server.routes import (admin, chat, completions, embeddings, generate, health, models, rag, responses,
                                   review, tokenize)
from servelm.server.settings import ServerSettings
from servelm.serving import rag as rag_stages

log = logging.getLogger("servelm.server")


def create_app(settings: ServerSettings, engine, pipeline: RequestPipeline | None = None,
               keys: KeyStore | None = None, announce=None) -> FastAPI:
    """Returns the app serving ``engine`` (an un-started ``servelm.engine.AsyncEngine``).

    The app's lifespan starts the engine and the embedding model, creates the first admin key on an
    empty key store, and on shutdown stops taking requests, lets in-flight ones finish (uvicorn
    waits for them) and shuts the engine down. ``announce(text)`` prints the start banner
    (``start_banner``; default: stderr).
    """
    if not settings.no_auth and keys is None:
        keys = open_key_store(settings)
    wait, per_key = settings.queue_wait_bound_s, settings.max_inflight_per_key
    # One embedding batch, one retrieval and one ingestion run at a time: each already uses every core.
    admission = Admission(settings.max_num_seqs, settings.max_queue, wait, settings.request_timeout_s, lanes={
        "embeddings": Lane("embedding", 1, settings.embedding_max_queue, per_key, wait),
        "rag": Lane("RAG query", 1, settings.rag_max_queue, per_key, wait),
        "upload": Lane("upload", 1, settings.upload_max_queue, per_key, wait)})
    metrics = Metrics(engine, admission, model_name=lambda: ctx.model_name)
    admission.on_refuse = lambda reason: metrics.rejected.labels(reason=reason).inc()
    guarding = build_guarding(settings, metrics.registry)
    ctx = ServerContext(settings=settings, engine=engine, keys=keys, limiter=RateLimiter(settings.redis_url),
                        admission=admission, metrics=metrics, pipeline=pipeline or guarding.pipeline(),
                        guarding=guarding)
    if settings.rag:  # after the guard's stages: the input check sees the client's own messages
        rag_stages.install(ctx.pipeline, ctx)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if guarding.guard is not None and guarding.guard.runs_pii():
            # Import Presidio/spaCy before the concurrent loads, not inside them: imported in the warm-up
            # thread beside the model load it made a PII-on start 1.0 s slower on 2 cores (11.88 vs
            # 10.77 s, bench/startup.py, docs/performance.md). With PII off it is never imported.
            await asyncio.to_thread(importlib.import_module, "servelm.safety.pii_analyzer")
        # The two models load at once: each spends most of its time in file reads and torch init.
        await asyncio.gather(engine.start(), _load_embedder(ctx), _warm_guard(guarding),
                             rag_stage.load(ctx))
        if guarding.guard is None:
            log.warning("guardrails are OFF (--no-guard): no input or output scanning, no review queue")
        else:
            log.info("guardrails on", extra={"policy": settings.policy or "default", "reviews_db": "postgresql" if settings.pg_url else settings.reviews_db,
                                             "fallback": settings.fallback})
        guarding.serve_context(engine.max_model_len)
        if ctx.rag is not None:
            ctx.rag.context_window = engine.max_model_len
        if settings.no_auth:
            log.warning("authentication is OFF (--no-auth): anyone who can reach %s can use it",
                        settings.public_url)
            key = None
        else:
            key = _bootstrap_admin_key(ctx)
        # Printed, never logged: the key must not reach log files or a log pipeline.
        (announce or _print)(start_banner(ctx, key))
        ctx.ready = True
        log.info("ready", extra={"model": ctx.model_name, "url": settings.public_url,
                                 "rate_limits": ctx.limiter.backend, "auth": not settings.no_auth})
        try:
            yield
        finally:
            ctx.ready = False
            admission.draining = True
            await engine.shutdown()
            await ctx.limiter.close()
            if keys is not None:
                keys.close()
            if guarding.guard is not None and guarding.guard.review_queue is not None:
                guarding.guard.review_queue.close()
            if ctx.rag is not None:
                ctx.rag.close()

    app = FastAPI(title="servelm", version=servelm.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible LLM server. Authenticate with `Authorization: Bearer <key>`.")
    app.state.servelm = ctx
    install_handlers(app)
    for module in (chat, responses, completions, embeddings, models, tokenize, generate, health, admin, review, rag):
        app.include_router(module.router)
    playground.install(app)  # the web page at /playground and its small read-only API
    api_docs.install(app)  # /docs and /redoc, with their assets served from here (no CDN)
    app.add_middleware(RequestMiddleware, max_body_bytes=settings.max_body_bytes, get_metrics=lambda: ctx.metrics,
                       upload_max_bytes=settings.rag_max_file_bytes * 4)
    # Outermost, so every answer (also a 413 or 401) carries the CORS headers a browser needs to read it,
    # and a preflight OPTIONS is answered here, before routing and auth (vLLM's defaults: all allowed).
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                       allow_methods=settings.allowed_methods, allow_headers=settings.allowed_headers,
                       allow_credentials=settings.allow_credentials, expose_headers=["x-request-id"])
    return app


async def _warm_guard(guarding) -> None:
    # Classifiers and Presidio/spaCy load now, not on the first request.
    if guarding.guard is not None:
        await asyncio.to_thread(guarding.guard.warmup)


async def _load_embedder(ctx: ServerContext) -> None:
    if ctx.settings.embedding_model:
        from servelm.server.embedder import Embedder

        ctx.embedder = await asyncio.to_thread(Embedder, ctx.settings.embedding_model,
                                               ctx.settings.embedding_model_name)


def _print(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _bootstrap_admin_key(ctx: ServerContext) -> str | None:
    """Returns a new ``admin`` key on a first start (no key ever created), else None."""
    if ctx.keys.count() > 0:
        return None
    return ctx.keys.create("admin", ("admin",))[0]


def start_banner(ctx: ServerContext, admin_key: str | None) -> str:
    """Returns the text printed on every start: where the server, playground and docs are, the model,
    and the admin key just created (first start only) or how to make a key. The examples start at
    column 0, so they paste as they are into a shell or ``python3``."""
    from servelm.paths import default_data_dir

    s, url = ctx.settings, ctx.settings.public_url
    data_dir = "" if s.data_dir == default_data_dir() else f" --data-dir {shlex.quote(s.data_dir)}"
    lines = ["=" * 80,
             f"servelm: serving {ctx.model_name}",
             f"  API:        {url}/v1",
             f"  Playground: {url}/playground",
             f"  API docs:   {url}/docs",
             ""]
    if s.no_auth:
        key = "none"
        lines += ["Authentication is OFF (--no-auth): any key is accepted.", ""]
    elif admin_key:
        key = admin_key
        lines += ["First start: created an admin API key (shown only now; store it):", "", admin_key, ""]
    else:
        key = "YOUR_KEY"
        lines += ["Use a key you created; to make one (printed once):",
                  f"servelm keys{data_dir} create --name NAME --scopes chat,embeddings,models", ""]
    body = json.dumps({"model": ctx.model_name, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 32})
    lines += [f"curl {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
              f"-H 'Content-Type: application/json' -d '{body}'",
              "",
              "from openai import OpenAI",
              f'client = OpenAI(base_url="{url}/v1", api_key="{key}")',
              f'reply = client.chat.completions.create(model="{ctx.model_name}", '
              'messages=[{"role": "user", "content": "Hello!"}], max_tokens=32)',
              "print(reply.choices[0].message.content)",
              "=" * 80]
    return "\n" + "\n".join(lines) + "\n"
