"""RAG routes: collections, document upload, and grounded answers with cited sources.

Scopes: changing a collection (create, delete, upload, delete a document) needs ``rag``; reading one
(list, get, documents, chunks) and asking it (``/v1/rag/query``) needs ``chat`` or ``rag``. ``admin``
holds both.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from servelm.rag.schemas import CollectionCreate, RagQueryRequest, RagQueryResponse
from servelm.server import sse
from servelm.server.auth import Principal, require
from servelm.server.context import get_context
from servelm.server.errors import APIError, invalid
from servelm.server.rag_stage import engine_generate
from servelm.serving.rag import rag_error
from servelm.server.schemas import INT64_MAX, first_wide_int
from servelm.server.serving import until_disconnect

router = APIRouter(tags=["rag"])
log = logging.getLogger("servelm.server")

WRITE = require("rag")
READ = require("chat", "rag")


def _svc(request: Request):
    ctx = get_context(request)
    if ctx.rag is None:
        raise APIError(404, "RAG is turned off on this server (started with --no-rag).", code="rag_disabled")
    return ctx.rag


async def _call(awaitable, param: str | None = None):
    try:
        return await awaitable
    except (LookupError, ValueError) as e:
        raise rag_error(e, param) from None


@router.post("/v1/collections", summary="Create a collection", status_code=201)
async def create_collection(body: CollectionCreate, request: Request, principal: Principal = Depends(WRITE)):
    """Returns the new collection (201); 409 when the name is taken."""
    return (await _call(_svc(request).create_collection(body), "name")).model_dump()


@router.get("/v1/collections", summary="List collections")
async def list_collections(request: Request, principal: Principal = Depends(READ)):
    """Returns ``{"object": "list", "data": [collection, ...]}``."""
    return (await _call(_svc(request).list_collections())).model_dump()


@router.get("/v1/collections/{name}", summary="Get a collection (documents and chunk counts)")
async def get_collection(name: str, request: Request, principal: Principal = Depends(READ)):
    """Returns the collection; 404 when unknown."""
    return (await _call(_svc(request).get_collection(name), "name")).model_dump()


@router.delete("/v1/collections/{name}", summary="Delete a collection and all its documents")
async def delete_collection(name: str, request: Request, principal: Principal = Depends(WRITE)):
    """Returns ``{"name", "object": "collection", "deleted": true}``; 404 when unknown."""
    return (await _call(_svc(request).delete_collection(name), "name")).model_dump()


@router.get("/v1/collections/{name}/documents", summary="List a collection's documents")
async def list_documents(name: str, request: Request, principal: Principal = Depends(READ)):
    """Returns ``{"object": "list", "data": [{doc_id, source, content_hash, num_chunks}, ...]}``."""
    return {"object": "list", "data": await _call(_svc(request).list_documents(name), "name")}


@router.delete("/v1/collections/{name}/documents/{doc_id}", summary="Delete one document and its vectors")
async def delete_document(name: str, doc_id: str, request: Request, principal: Principal = Depends(WRITE)):
    """Returns ``{"doc_id", "deleted": true}``; 404 for an unknown collection or document."""
    await _call(_svc(request).delete_document(name, doc_id), "doc_id")
    return {"object": "document", "doc_id": doc_id, "deleted": True}


@router.get("/v1/collections/{name}/chunks/{chunk_id}", summary="Get a chunk (to show a cited passage)")
async def get_chunk(name: str, request: Request, chunk_id: int = Path(ge=0, le=INT64_MAX),
                     principal: Principal = Depends(READ)):
    """Returns ``{chunk_id, doc_id, source, page, start, end, text}`` (``text`` under the output PII policy,
    as the sources of answers are); 404 when unknown."""
    import asyncio

    svc = _svc(request)
    await _call(svc.get_collection(name), "name")
    chunks = await asyncio.to_thread(svc.store.get_chunks, name, [chunk_id])
    if not chunks:
        raise APIError(404, f"Collection {name!r} has no chunk {chunk_id}.", param="chunk_id", code="chunk_not_found")
    c = chunks[0]
    # The chunk quotes the document: it leaves under the same output PII policy as the answers' sources.
    rid = request.scope["servelm"]["request_id"]
    text, = await get_context(request).guarding.redact_sources([c.text], rid, principal.name)
    return {"object": "chunk", "chunk_id": c.id, "doc_id": c.doc_id, "source": c.source, "page": c.page,
            "start": c.start, "end": c.end, "text": text}


@router.post("/v1/collections/{name}/documents", summary="Upload documents (multipart, field 'file', repeatable)")
async def upload_documents(name: str, request: Request, principal: Principal = Depends(WRITE)):
    """Ingests every uploaded file; a bad file gets its own error while the others are ingested.

    Returns 200 with ``{"object": "list", "data": [result, ...], "ingested", "failed"}`` when all went in,
    207 when some failed (each failed result carries ``error: {message, code, status}``), and when all
    failed that file's status (400 bad file, 413 over the size limit, 415 unsupported type) with an
    OpenAI error body plus ``data``. 404 for an unknown collection.
    """
    from servelm.server.uploads import check_upload

    svc = _svc(request)
    await _call(svc.get_collection(name), "name")
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise APIError(400, "Upload files as multipart/form-data with one or more 'file' fields "
                            "(curl -F file=@report.pdf).", param="file", code="invalid_content_type")
    # The upload waits its turn before its body is read, so refused uploads cost no memory.
    async with get_context(request).admission.lanes["upload"].slot(principal.name):
        form = await request.form()
        try:
            files = [f for _, f in form.multi_items() if isinstance(f, UploadFile)]
            if not files:
                raise invalid("No file in the upload; send one or more 'file' fields (curl -F file=@report.pdf).",
                              "file", "missing_file")
            results = []
            for f in files:
                data = await f.read()
                filename = f.filename or ""
                error = check_upload(filename, data, svc.cfg.max_file_bytes)
                if error is None:
                    try:
                        r = await svc.add_document(name, filename, data)
                        results.append(r.model_dump(exclude_none=True))
                        continue
                    except (LookupError, ValueError) as e:
                        error = _file_error(e)
                results.append({"source": filename, "status": "error", "chunks": 0, "error": error})
        finally:
            await form.close()
    failed = [r for r in results if r["status"] == "error"]
    body = {"object": "list", "data": results, "ingested": len(results) - len(failed), "failed": len(failed)}
    if not failed:
        return body
    if len(failed) < len(results):
        return JSONResponse(body, status_code=207)
    statuses = {r["error"]["status"] for r in failed}
    status = statuses.pop() if len(statuses) == 1 else 400
    first = failed[0]["error"]
    more = f" (and {len(failed) - 1} more failed files; see data)" if len(failed) > 1 else ""
    err = APIError(status, first["message"] + more, param="file", code=first["code"])
    return JSONResponse(err.body() | {"data": results}, status_code=status)


def _file_error(exc: BaseException) -> dict:
    from servelm.server.uploads import classify

    if isinstance(exc, LookupError):
        raise rag_error(exc, "name")
    message = str(exc.args[0]) if exc.args else str(exc)
    status, code = classify(message)
    return {"message": message, "code": code, "status": status}


@router.post("/v1/rag/query", summary="Answer a question from a collection, with cited sources")
async def rag_query(req: RagQueryRequest, request: Request, principal: Principal = Depends(READ)):
    """Returns ``{"answer", "sources": [{source, page, start, end, snippet, score, ...}], "found"}``, or with
    ``stream: true`` SSE events ``{"delta"}`` then the final response, then ``data: [DONE]``.

    Guarded as chat is: the query passes the input guard (400 ``content_filter``, or held for review), and
    the answer the output guard (redacted, or ``finish_reason: "content_filter"``; streamed answers are
    scanned before a token leaves)."""
    ctx = get_context(request)
    svc = _svc(request)
    if (where := first_wide_int(req.model_dump())) is not None:  # the server's bodies check this in their schema
        raise invalid(f"Invalid value for '{where}': integers must lie between -2**63 and 2**63-1.", where)
    g, rid = ctx.guarding, request.scope["servelm"]["request_id"]
    held = await g.check_prompt(req.query, rid, principal.name, param="query")
    if held is not None:  # held for human review: nothing is retrieved or generated
        out = RagQueryResponse(answer=held.text, sources=[], found=False, finish_reason="content_filter",
                               servelm=held.servelm)
        headers = {"x-servelm-review-id": held.servelm["review_id"]}
        return _single(out, headers) if req.stream else JSONResponse(_body(out), headers=headers)
    lane = ctx.admission.lanes["rag"]
    if not req.stream:
        async with lane.slot(principal.name) as retrieved:
            # retrieval holds the lane's place; the answer is generated under the engine's admission
            generate = engine_generate(ctx, request, principal, req.max_tokens, req.temperature, on_start=retrieved)
            answer = await until_disconnect(request, _call(svc.query(req, generate), "collection"))
        if answer.found:
            a = await g.scan_output(answer.answer, rid, principal.name, req.query, supplied=req.query)
            _guarded(answer, a.text, a.finish_reason, a.servelm)
            await _redact_sources(g, svc, req.collection, answer, rid, principal.name, req.query)
        return _body(answer)
    stage = g.stream_scanner(rid, principal.name, req.query, supplied=req.query)
    async with lane.slot(principal.name) as retrieved:
        generate = engine_generate(ctx, request, principal, req.max_tokens, req.temperature, on_start=retrieved)
        events = svc.query_stream(req, _scanned(generate, stage))
        # The first event comes after retrieval and admission: errors there still get their HTTP status.
        first = await _call(anext(events), "collection")
    return sse.EventStream(content=_stream(first, events, request, stage, principal.name, req))


def _body(m) -> dict:
    """Returns a RAG response or event as JSON, without the guard's fields when it said nothing."""
    body = m.model_dump(mode="json")
    return {k: v for k, v in body.items() if v is not None or k not in ("finish_reason", "servelm")}


def _guarded(answer: RagQueryResponse, text: str, finish_reason: str | None, note: dict | None) -> None:
    """Puts the guard's verdict on ``answer``; a stopped answer lists no sources."""
    answer.answer, answer.finish_reason, answer.servelm = text, finish_reason, note or None
    if finish_reason == "content_filter":
        answer.sources = []


async def _redact_sources(g, svc, collection: str, answer: RagQueryResponse, request_id: str, key_name: str,
                          question: str) -> None:
    """Applies the output PII policy to the cited snippets, which quote the documents verbatim: each redacted as
    its whole chunk is (GET .../chunks/{id}), so a snippet stays a substring of its chunk."""
    if not answer.sources or g.guard is None:
        return
    found = await asyncio.to_thread(svc.store.get_chunks, collection, [s.chunk_id for s in answer.sources])
    texts = {c.id: c.text for c in found}
    chunks = [texts.get(s.chunk_id, s.snippet) for s in answer.sources]
    windows = [(max(c.find(s.snippet), 0), max(c.find(s.snippet), 0) + len(s.snippet))
               for c, s in zip(chunks, answer.sources)]
    snippets = await g.redact_sources(chunks, request_id, key_name, question, windows=windows)
    for s, snippet in zip(answer.sources, snippets):
        s.snippet = snippet


def _scanned(generate, stage):
    """Returns ``generate`` with its deltas passed through the output guard's stream stage."""
    async def scanned(messages):
        async with aclosing(generate(messages)) as deltas:
            async for d in deltas:
                if out := await stage.feed(d):
                    yield out
                if stage.finish_reason:
                    return  # the guard ended the answer: closing the stream aborts the generation
        if tail := await stage.end():
            yield tail

    return scanned


def _single(out: RagQueryResponse, headers: dict):
    async def events():
        yield sse.event(_body(out))
        yield sse.DONE

    return sse.EventStream(headers=headers, content=events())


async def _stream(first, events, request: Request, stage, key_name: str, req: RagQueryRequest):
    rid = request.scope.get("servelm", {}).get("request_id")
    g = get_context(request).guarding
    try:
        yield sse.event(_body(first))
        async for ev in events:
            if isinstance(ev, RagQueryResponse) and ev.found:
                _guarded(ev, ev.answer, stage.finish_reason, stage.servelm)
                await _redact_sources(g, _svc(request), req.collection, ev, rid, key_name, req.query)
            yield sse.event(_body(ev))
    except APIError as e:
        yield sse.error_event(e.body())
    except (LookupError, ValueError) as e:
        yield sse.error_event(rag_error(e).body())
    except Exception:
        log.exception("rag stream failed", extra={"request_id": rid})
        yield sse.error_event(APIError(503, "Generation failed inside the engine; retry.", code="engine_error").body())
    finally:
        await events.aclose()
    yield sse.DONE

