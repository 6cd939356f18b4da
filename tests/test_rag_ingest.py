"""Ingestion: per-file errors in a batch, re-ingest, de-duplication, SIGKILL mid-ingest, the CLI."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from servelm.rag.config import RagConfig
from servelm.rag.service import RagService
from tests.rag_support import FIXTURES, embedder, wiki_texts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def svc(tmp_path):
    s = RagService(RagConfig(data_dir=str(tmp_path / "data"), chunk_size=128, chunk_overlap=16), embedder=embedder())
    yield s
    s.close()


def fixture_dir(tmp_path):
    d = tmp_path / "docs"
    shutil.copytree(FIXTURES, d)
    os.unlink(d / "make_fixtures.py")
    (d / "sub").mkdir()
    (d / "sub" / "empty.txt").write_bytes(b"")
    (d / "sub" / "big.txt").write_bytes(b"word " * 300_000)  # 1.5 MB > the 1 MB limit below
    (d / "sub" / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (d / "sub" / "tides.txt").write_text("Spring tides follow the full and new moon.\n")
    return d


def by_name(report):
    return {os.path.basename(r.source): r for r in report.results}


def test_batch_reports_each_bad_file_and_ingests_the_rest(svc, tmp_path):
    svc.ingestor.max_file_bytes = 1_000_000
    d = fixture_dir(tmp_path)
    rep = by_name(svc.ingest_paths("kb", [str(d), str(tmp_path / "missing.txt")], progress=False))
    assert {n for n, r in rep.items() if r.status == "added"} == {"sample.pdf", "page.html", "notes.md", "tides.txt"}
    errors = {n: r.error for n, r in rep.items() if r.status == "error"}
    assert set(errors) == {"encrypted.pdf", "corrupt.pdf", "empty.txt", "big.txt", "photo.png", "missing.txt"}
    assert "encrypted" in errors["encrypted.pdf"] and "corrupt PDF" in errors["corrupt.pdf"]
    assert "empty" in errors["empty.txt"] and "size limit" in errors["big.txt"]
    assert "unsupported file type" in errors["photo.png"] and "no such file" in errors["missing.txt"]
    pdf_chunks = svc.store.get_chunks("kb", sorted(svc.store.filter_ids("kb", {"source": str(d / "sample.pdf")})))
    assert [c.page for c in pdf_chunks] == [1, 2]


def test_reingest_updates_changed_removes_deleted_and_dedups(svc, tmp_path):
    d = tmp_path / "kb"
    d.mkdir()
    (d / "a.txt").write_text("The observatory measures the tide every six minutes.")
    (d / "b.md").write_text("# Bees\nA hive holds forty thousand bees.")
    (d / "c.txt").write_text("Kerosene replaced whale oil in 1890.")
    first = by_name(svc.ingest_paths("kb", [str(d)], progress=False))
    assert {r.status for r in first.values()} == {"added"}
    (d / "a.txt").write_text("The observatory now measures the tide every minute.")
    os.unlink(d / "c.txt")
    (d / "copy.txt").write_text("Kerosene replaced whale oil in 1890.")  # c.txt moved: must not be lost
    (d / "dup.md").write_text("# Bees\nA hive holds forty thousand bees.")  # same bytes as b.md
    second = by_name(svc.ingest_paths("kb", [str(d)], progress=False))
    assert second["a.txt"].status == "updated" and second["b.md"].status == "unchanged"
    assert second["dup.md"].status == "duplicate" and "b.md" in second["dup.md"].error
    assert second["c.txt"].status == "removed"
    sources = sorted(os.path.basename(x.source) for x in svc.store.list_documents("kb"))
    assert sources == ["a.txt", "b.md", "copy.txt"] and second["copy.txt"].status == "added"
    texts = svc.store.all_texts("kb")[1]
    assert not any("every six minutes" in t for t in texts) and any("every minute" in t for t in texts)
    assert sum("whale oil" in t for t in texts) == 1


KILL_SCRIPT = r"""
import sys
from servelm.rag.config import RagConfig
from servelm.rag.service import RagService
# Batches of 2 chunks (one document each), so documents are committed one by one.
svc = RagService(RagConfig(data_dir=sys.argv[1], chunk_size=128, chunk_overlap=16, embed_batch_size=2))
def committed(r):
    print("committed", r.status, flush=True)
svc.ingest_paths("kb", [sys.argv[2]], progress=False, on_file=committed)
print("finished", flush=True)
"""


def test_sigkill_during_ingest_keeps_committed_documents(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = wiki_texts()
    for i in range(8):
        (docs / f"art{i:02d}.txt").write_text(texts[i % len(texts)][:700] + f"\n\nCopy {i}.")
    data = tmp_path / "data"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(data), str(docs)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    seen = 0
    for line in p.stdout:
        assert line.startswith("committed added"), line
        seen += 1
        if seen == 2:
            p.send_signal(signal.SIGKILL)  # the 3rd document is being embedded or written now
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL
    svc = RagService(RagConfig(data_dir=str(data), chunk_size=128, chunk_overlap=16), embedder=embedder())
    try:
        docs_in = svc.store.list_documents("kb")
        assert 2 <= len(docs_in) < 8
        ids, _ = svc.store.all_texts("kb")
        assert len(ids) == sum(d.num_chunks for d in docs_in)  # no half-written document
        hits = svc.retriever.retrieve("kb", "anarchism political philosophy", k=5)
        assert hits and all(h.chunk.doc_id in {d.doc_id for d in docs_in} for h in hits)
        rest = by_name(svc.ingest_paths("kb", [str(docs)], progress=False))  # resuming finishes the job
        assert sum(r.status == "unchanged" for r in rest.values()) == len(docs_in)
        assert len(svc.store.list_documents("kb")) == 8
    finally:
        svc.close()


def test_cli_ingest_reports_errors_and_ingests_the_rest(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    data = tmp_path / "data"
    r = subprocess.run([sys.executable, "-m", "servelm.rag.cli", os.path.join(FIXTURES, "notes.md"),
                        os.path.join(FIXTURES, "encrypted.pdf"), "--collection", "cli", "--data-dir", str(data),
                        "--jobs", "1"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "encrypted.pdf: the PDF is encrypted" in r.stderr
    assert "ingest → cli" in r.stderr and "chunk" in r.stderr and "2/2 files" in r.stderr  # the progress bar
    report = json.loads(r.stdout)
    assert report["counts"] == {"added": 1, "error": 1} and report["chunks"] >= 1


def test_a_query_is_embedded_between_the_batches_of_a_long_ingest():
    """A large upload embeds batch by batch, and a query waiting for the model goes before the next batch,
    so search on any collection stays responsive while a big document is ingested."""
    import threading

    from servelm.rag.embedder import Embedder

    shared = embedder()
    emb = Embedder.__new__(Embedder)  # the session's loaded model, with small batches and no cache
    emb.__dict__.update(shared.__dict__)
    emb.batch_size, emb.cache = 2, None
    emb._turn, emb._busy, emb._queries_waiting = threading.Condition(), False, 0
    started, real = threading.Event(), emb.model

    class Spy:  # the real model; tells the test when the ingest's first batch runs
        def encode(self, texts, **kw):
            started.set()
            return real.encode(texts, **kw)

    emb.model = Spy()
    texts = [f"Paragraph {i} of a long upload about harbour moorings and ferry timetables." for i in range(200)]
    ingest = threading.Thread(target=emb.embed_passages, args=(texts, [[(0, len(t))] for t in texts]))
    ingest.start()
    assert started.wait(60)
    vec = emb.embed_query("When does the ferry leave?")
    assert ingest.is_alive()  # the query did not wait for the 100 batches of the ingest
    ingest.join()
    assert vec.shape == (emb.dim,) and abs(float((vec ** 2).sum()) - 1.0) < 1e-4
