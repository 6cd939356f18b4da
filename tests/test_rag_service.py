"""RagService, the facade behind the routes: collections, uploads, answers with citations,
the "not in the documents" answer, filters, MMR, streaming, chat augmentation, pgvector backend."""
import asyncio
import os

import pytest

from servelm.rag.answer import NO_ANSWER
from servelm.rag.config import RagConfig
from servelm.rag.schemas import CollectionCreate, RagOptions, RagQueryRequest, RagQueryResponse, RagStreamDelta
from servelm.rag.service import BadDocument, RagService, http_status
from tests.rag_support import FIXTURES, embedder, pg_uri

FILES = ("sample.pdf", "page.html", "notes.md")


def read(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


async def make(tmp_path, store=None, name="kb"):
    svc = RagService(RagConfig(data_dir=str(tmp_path / "data"), chunk_size=64, chunk_overlap=8), embedder=embedder(),
                     store=store)
    await svc.create_collection(CollectionCreate(name=name))
    for f in FILES:
        r = await svc.add_document(name, f, read(f))
        assert r.status == "added" and r.chunks >= 1
    return svc


@pytest.fixture(scope="module", params=["faiss", "pgvector"])
def svc(request, tmp_path_factory):
    """One ingested service per backend for the module (ingesting is the slow part)."""
    store = None
    if request.param == "pgvector":
        from servelm.rag.store.pgvector_store import PgVectorStore
        store = PgVectorStore(pg_uri())
        for c in store.list_collections():
            store.delete_collection(c.name)
    s = asyncio.run(make(tmp_path_factory.mktemp("svc"), store=store))
    yield s
    s.close()


def citing_writer(text):
    """An answer writer that returns ``text`` in pieces (what a model streaming deltas looks like)."""
    calls = []

    async def generate(messages):
        calls.append(messages)
        for i in range(0, len(text), 7):
            yield text[i:i + 7]
    generate.calls = calls
    return generate


async def test_collection_routes_and_errors(svc):
    await svc.create_collection(CollectionCreate(name="tmp"))
    assert [c.name for c in (await svc.list_collections()).data] == ["kb", "tmp"]
    info = await svc.get_collection("kb")
    assert info.num_documents == 3 and info.model == "all-MiniLM-L6-v2" and info.dim == 384
    with pytest.raises(Exception) as e:
        await svc.create_collection(CollectionCreate(name="kb"))
    assert http_status(e.value) == 409
    with pytest.raises(Exception) as e:
        await svc.add_document("nope", "a.txt", b"hello")
    assert http_status(e.value) == 404
    with pytest.raises(BadDocument, match="encrypted") as e:
        await svc.add_document("kb", "encrypted.pdf", read("encrypted.pdf"))
    assert http_status(e.value) == 400
    again = await svc.add_document("kb", "notes.md", read("notes.md"))
    assert again.status == "unchanged"
    r = await svc.add_document("tmp", "tides.txt", b"Spring tides follow the full moon.")
    assert r.status == "added"
    assert (await svc.delete_collection("tmp")).deleted
    assert [c.name for c in (await svc.list_collections()).data] == ["kb"]
    with pytest.raises(Exception) as e:
        await svc.retrieve("tmp", "tides")
    assert http_status(e.value) == 404


async def test_every_citation_points_at_a_chunk_containing_its_snippet(svc):
    gen = citing_writer("The lighthouse dates from 1873 [1]. Kerosene came later [1, 2]; see also [9].")
    r = await svc.query(RagQueryRequest(collection="kb", query="When was the Fenwick lighthouse built?", k=3), gen)
    assert r.found and r.sources and r.answer.startswith("The lighthouse")
    assert r.sources[0].source == "sample.pdf" and r.sources[0].page == 1
    assert "1873" in r.sources[0].snippet
    assert [s.index for s in r.sources] == sorted({s.index for s in r.sources}, key=[s.index for s in r.sources].index)
    assert all(s.index in (1, 2) for s in r.sources)  # the invented [9] is dropped
    for s in r.sources:
        (chunk,) = svc.store.get_chunks("kb", [s.chunk_id])
        assert s.snippet and s.snippet in chunk.text
        assert (chunk.source, chunk.page, chunk.start, chunk.end) == (s.source, s.page, s.start, s.end)
    prompt = gen.calls[0][-1]["content"]
    assert '<document index="1" source="sample.pdf" page="1">' in prompt and "When was the Fenwick" in prompt


async def test_below_threshold_says_documents_do_not_contain_it(svc):
    gen = citing_writer("should not be called")
    r = await svc.query(RagQueryRequest(collection="kb", query="Who won the 1998 FIFA World Cup final?"), gen)
    assert (r.answer, r.sources, r.found) == (NO_ANSWER, [], False)
    assert gen.calls == []


async def test_a_request_can_ask_for_closer_passages(svc):
    """min_relevance (LlamaIndex's similarity_cutoff per request): an answerable question with a bar above its
    best passage gets "not in the documents" instead of an answer from loosely related text."""
    gen = citing_writer("The lighthouse dates from 1873 [1].")
    q = "When was the Fenwick lighthouse built?"
    best = (await svc.retrieve("kb", q, k=1))[0].relevance
    assert (await svc.query(RagQueryRequest(collection="kb", query=q, min_relevance=round(best - 0.05, 3)), gen)).found
    r = await svc.query(RagQueryRequest(collection="kb", query=q, min_relevance=min(1.0, best + 0.05)), gen)
    assert (r.answer, r.found) == (NO_ANSWER, False) and len(gen.calls) == 1


async def test_stream_then_final_response(svc):
    events = [e async for e in svc.query_stream(
        RagQueryRequest(collection="kb", query="How many worker bees does a strong hive hold?"),
        citing_writer("About forty thousand [1]."))]
    assert all(isinstance(e, RagStreamDelta) for e in events[:-1]) and isinstance(events[-1], RagQueryResponse)
    assert "".join(e.delta for e in events[:-1]) == events[-1].answer == "About forty thousand [1]."
    assert events[-1].sources[0].source == "page.html" and "forty thousand" in events[-1].sources[0].snippet


async def test_filters_and_mmr(svc):
    hits = await svc.retrieve("kb", "temperature and time to bake bread", k=3, filters={"source": "notes.md"})
    assert hits and {h.chunk.source for h in hits} == {"notes.md"}
    mmr = await svc.retrieve("kb", "lighthouse", k=3, mmr=True)
    assert len({h.chunk.id for h in mmr}) == len(mmr) == 3


async def test_chat_augmentation_fits_the_context_window(svc):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "When should frames be inspected?"}]
    out, used = await svc.augment(msgs, RagOptions(collection="kb", k=5))
    assert used and out[-1]["role"] == "user" and "Inspect frames every nine days" in out[-1]["content"]
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    window = svc.context_window
    svc.context_window = svc.cfg.answer_reserve_tokens + svc.count_tokens(out) - 1  # one token short
    try:
        out2, used2 = await svc.augment(msgs, RagOptions(collection="kb", k=5))
    finally:
        svc.context_window = window
    assert len(used2) < len(used) and svc.count_tokens(out2) <= svc.context_window - svc.cfg.answer_reserve_tokens
