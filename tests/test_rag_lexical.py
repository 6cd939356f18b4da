"""Exact lexical matches: a rare token in a query (an error code, an id) finds its document among many."""
from __future__ import annotations

import random

import pytest

from tests.rag_support import embedder

MARKER = "zq0123marker"
DEVICES = ["pump", "boiler", "compressor", "valve", "turbine", "conveyor", "chiller", "generator", "mixer", "press"]
SITES = ["Leeds", "Porto", "Lyon", "Graz", "Turku", "Bilbao", "Gdansk", "Utrecht", "Aarhus", "Brno"]
SYMPTOMS = ["a pressure drop", "an overheating alarm", "a vibration warning", "a sensor timeout",
            "a checksum error", "a power dip", "an oil leak", "a calibration drift"]
ACTIONS = ["replaced the seal", "restarted the controller", "cleaned the filter", "updated the firmware",
           "tightened the bolts", "logged a ticket"]


def _documents(n: int, marked: int) -> list[str]:
    # Each note: one of 100 event sentences (shared by ~20 notes) and its own code; the query's other
    # words fit many notes better than the marked one, so only the code can find it.
    rng = random.Random(7)
    out = []
    for _ in range(n):
        d, s = rng.randrange(len(DEVICES)), rng.randrange(len(SITES))
        out.append(f"The {DEVICES[d]} at {SITES[s]} reported {SYMPTOMS[d % len(SYMPTOMS)]}. "
                   f"Code e{rng.randrange(10**6):06d} was logged.")
    out[marked] = f"The turbine at Graz reported a power dip. Code {MARKER} was logged."
    out[marked + 1] = "The lighthouse keeper on the island counts the seabirds nesting on the cliffs at dawn."
    return out


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    from servelm.rag.config import RagConfig
    from servelm.rag.embedder import Embedder, EmbeddingCache
    from servelm.rag.service import RagService

    root = tmp_path_factory.mktemp("lexical")
    docs = root / "docs"
    docs.mkdir()
    for i, text in enumerate(_documents(2000, marked=1234)):
        (docs / f"note{i:04d}.txt").write_text(text)
    emb = Embedder.__new__(Embedder)  # the session's loaded model with an embedding cache, as the server has
    emb.__dict__.update(embedder().__dict__)
    emb.cache = EmbeddingCache(str(root / "embeddings.sqlite"))
    svc = RagService(RagConfig(data_dir=str(root / "data")), embedder=emb)
    report = svc.ingest_paths("notes", [str(docs)], progress=False)
    assert report.to_dict()["counts"] == {"added": 2000}
    yield svc
    svc.close()


@pytest.mark.parametrize("query", [f"Which pump at Leeds had a pressure drop with code {MARKER}?", MARKER,
                                   f"was code {MARKER} logged for the compressor at Porto?"])
def test_a_rare_exact_token_finds_its_document_among_2000(kb, query):
    hits = kb.retriever.retrieve("notes", query, k=5)
    assert any(MARKER in h.chunk.text for h in hits), [h.chunk.text for h in hits]


def test_a_natural_language_query_still_finds_its_document(kb):
    hits = kb.retriever.retrieve("notes", "who counts the birds nesting near the lighthouse?", k=5)
    assert "seabirds" in hits[0].chunk.text
