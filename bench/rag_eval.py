"""RAG retrieval quality and speed; prints one JSON object.

Quality: a labelled question → passage set built from real text, the Wikipedia excerpt in
gensim's test data (first ``--articles`` articles). Questions are generated deterministically:
sentences of 12-40 words are sampled with a fixed seed; a sentence's *key phrase* (its
``--terms`` content words of highest IDF over the corpus, kept in sentence order, stopwords
dropped) is the question, and a retrieved chunk is relevant if it holds at least half of the
sentence's characters (so each pipeline is judged on its own chunk boundaries). Reported:
recall@k (a relevant chunk in the top k), MRR@10, nDCG@10 (binary gains).

Pipelines, same embedder (all-MiniLM-L6-v2) and same run:
  langchain-1000  RecursiveCharacterTextSplitter(1000, 200) + FAISS IndexFlatIP (LangChain's defaults in its docs)
  langchain-2000  RecursiveCharacterTextSplitter(2000, 200) + FAISS: chunks of about the size of servelm's 500 tokens
  servelm-*       servelm's splitter (500/50 tokens) and store, with the retrieval stages switched on one by one

Speed: ingest throughput (chunks/s through servelm's whole ingest: load, split, embed chunks
and sentences, store) and query latency p50/p99 (embed query + dense + BM25 + RRF + fetch +
re-rank, generation excluded) over ``--scale`` synthetic chunks (random corpus words, random
unit vectors: embedding 100k real chunks takes hours on 2 cores).

    HF_HUB_OFFLINE=1 python3 bench/rag_eval.py [--articles 40] [--scale 100000]
    HF_HUB_OFFLINE=1 python3 bench/rag_eval.py --skip-quality [--ann-threshold 50000]   # latency only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from servelm.rag.config import RagConfig, default_embed_model  # noqa: E402
from servelm.rag.embedder import Embedder, EmbeddingCache  # noqa: E402
from servelm.rag.retriever import Retriever  # noqa: E402
from servelm.rag.reranker import NoReranker, SentenceReranker  # noqa: E402
from servelm.rag.service import RagService  # noqa: E402
from servelm.rag.store.base import ChunkRecord, DocumentRecord  # noqa: E402
from servelm.rag.store.faiss_store import FaissStore  # noqa: E402

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def wiki_articles(n: int) -> list[tuple[str, str]]:
    """Return ``(title, text)`` of the first ``n`` real articles of gensim's Wikipedia excerpt."""
    import bz2

    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data",
                        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    out = []
    for title, text, _ in extract_pages(bz2.BZ2File(path)):
        t = filter_wiki(text).strip()
        if len(t) > 2000 and not t.startswith("#REDIRECT"):
            out.append((title, t))
        if len(out) == n:
            break
    return out


def make_questions(articles, per_article: int, terms: int, seed: int = 0) -> list[dict]:
    """Return questions ``{"doc", "start", "end", "query"}``: key phrases of sampled sentences."""
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    stop = set(STOPWORDS_EN_PLUS)
    sents = []
    for d, (_, text) in enumerate(articles):
        pos = 0
        for s in _SENT.split(text):
            start = text.index(s, pos)
            pos = start + len(s)
            if "\n" not in s.strip() and 12 <= len(s.split()) <= 40 and not re.search(r"[|{}=\[\]]", s):
                sents.append((d, start, start + len(s), s))
    df: dict[str, int] = {}
    for *_, s in sents:
        for w in {w.lower() for w in _WORD.findall(s)}:
            df[w] = df.get(w, 0) + 1
    rng = random.Random(seed)
    out = []
    for d in range(len(articles)):
        mine = [x for x in sents if x[0] == d]
        for _, a, b, s in rng.sample(mine, min(per_article, len(mine))):
            words = [w for w in _WORD.findall(s) if w.lower() not in stop and len(w) > 2]
            keep = set(sorted(set(w.lower() for w in words), key=lambda w: (df.get(w, 1), w))[:terms])
            seen, q = set(), []
            for w in words:
                if w.lower() in keep and w.lower() not in seen:
                    seen.add(w.lower())
                    q.append(w)
            out.append({"doc": d, "start": a, "end": b, "query": " ".join(q)})
    return out


def relevant(q, doc, start, end) -> bool:
    """A chunk is relevant if it holds at least half of the question's sentence."""
    return doc == q["doc"] and min(end, q["end"]) - max(start, q["start"]) >= 0.5 * (q["end"] - q["start"])


def metrics(questions, ranked: list[list[tuple[int, int, int]]]) -> dict:
    """Return recall@1/5/10, MRR@10 and nDCG@10 of ranked ``(doc, start, end)`` lists."""
    rec = {1: 0, 5: 0, 10: 0}
    mrr = ndcg = 0.0
    for q, r in zip(questions, ranked):
        rel = [relevant(q, *x) for x in r[:10]]
        first = next((i for i, x in enumerate(rel) if x), None)
        for k in rec:
            rec[k] += first is not None and first < k
        mrr += 1 / (first + 1) if first is not None else 0
        dcg = sum(1 / math.log2(i + 2) for i, x in enumerate(rel) if x)
        n_rel = max(1, min(10, sum(rel)))  # relevant chunks of a sentence sit side by side
        ndcg += dcg / sum(1 / math.log2(i + 2) for i in range(n_rel))
    n = len(questions)
    return {"recall@1": rec[1] / n, "recall@5": rec[5] / n, "recall@10": rec[10] / n, "mrr@10": mrr / n, "ndcg@10": ndcg / n}


def langchain_pipeline(articles, questions, emb: Embedder, size: int, overlap: int) -> dict:
    """LangChain's splitter + exact FAISS with the same embedder (truncating long chunks, as it does)."""
    import faiss
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    t0 = time.time()
    sp = RecursiveCharacterTextSplitter(chunk_size=size, chunk_overlap=overlap, add_start_index=True)
    chunks = []
    for d, (_, text) in enumerate(articles):
        for doc in sp.create_documents([text]):
            a = doc.metadata["start_index"]
            chunks.append((d, a, a + len(doc.page_content), doc.page_content))
    # LangChain's embeddings call encode() directly: over-long chunks are truncated to 256 tokens.
    # Cached under a distinct key so reruns do not re-embed.
    keys = [emb.key("truncated:" + c[3]) for c in chunks]
    found = emb.cache.get_many(keys) if emb.cache else {}
    todo = [i for i, k in enumerate(keys) if k not in found]
    if todo:
        new = emb._encode([chunks[i][3] for i in todo])
        if emb.cache:
            emb.cache.put_many([(keys[i], v) for i, v in zip(todo, new)])
        found.update({keys[i]: v for i, v in zip(todo, new)})
    vecs = np.stack([found[k] for k in keys])
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    ingest_s = time.time() - t0
    cached = len(chunks) - len(todo)
    qv = emb._encode([q["query"] for q in questions])
    _, ids = index.search(qv, 10)
    ranked = [[chunks[i][:3] for i in row if i >= 0] for row in ids]
    speed = round(len(chunks) / ingest_s, 1) if not cached else None  # only meaningful without cache hits
    return {"chunks": len(chunks), "ingest_chunks_per_s": speed, **metrics(questions, ranked)}


def servelm_pipelines(articles, questions, emb: Embedder, workdir: str) -> dict:
    """servelm ingest once, then retrieval with stages switched on one by one."""
    cfg = RagConfig(data_dir=os.path.join(workdir, "servelm"), embed_model=emb.model_path)
    svc = RagService(cfg, embedder=emb)
    svc.store.create_collection("wiki", emb.dim, emb.name)
    t0 = time.time()
    for d, (title, text) in enumerate(articles):
        svc.ingestor.ingest_bytes("wiki", f"{d:03d}.txt", text.encode(), source=f"{d:03d}")
    ingest_s = time.time() - t0
    n_chunks = svc.store.get_collection("wiki").num_chunks
    out = {}
    variants = {"servelm-dense": (False, NoReranker()), "servelm-hybrid-rrf": (True, NoReranker()),
                "servelm-dense+rerank": (False, SentenceReranker()), "servelm-hybrid+rerank (default)": (True, SentenceReranker())}
    for name, (bm25, rr) in variants.items():
        r = Retriever(svc.store, emb, RagConfig(**{**_cfg_dict(svc.cfg), "use_bm25": bm25}), reranker=rr)
        ranked = [[(int(h.chunk.source), h.chunk.start, h.chunk.end) for h in r.retrieve("wiki", q["query"], k=10)]
                  for q in questions]
        out[name] = {"chunks": n_chunks, **metrics(questions, ranked)}
    out["servelm-dense"]["ingest_chunks_per_s"] = round(n_chunks / ingest_s, 1)
    svc.close()
    return out


def _cfg_dict(cfg) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


def latency_at_scale(n: int, questions, emb: Embedder, workdir: str, vocab: list[str], n_queries: int = 300,
                     ann_threshold: int = 0) -> dict:
    """Return query latency p50/p99 (ms, wall and this process's CPU time) of the default pipeline over
    ``n`` synthetic chunks, and the p50 of each stage. ``ann_threshold`` > 0 searches with FAISS IVF."""
    store = FaissStore(os.path.join(workdir, "scale"), ann_threshold=ann_threshold)
    store.create_collection("scale", emb.dim, emb.name)
    rng = np.random.default_rng(0)
    t0 = time.time()
    per_doc = 1000
    for d in range(0, n, per_doc):
        m = min(per_doc, n - d)
        vecs = rng.standard_normal((m, emb.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        sv = rng.standard_normal((m, 4, emb.dim)).astype(np.float32)
        sv /= np.linalg.norm(sv, axis=2, keepdims=True)
        recs = []
        for i in range(m):
            words = " ".join(vocab[j] for j in rng.integers(0, len(vocab), 80))
            recs.append(ChunkRecord(f"d{d}", f"syn{d}", words, i * 500, i * 500 + len(words), None, i, {}, vecs[i],
                                    [(0, 100), (101, 200), (201, 300), (301, len(words))], sv[i]))
        store.replace_document("scale", DocumentRecord(f"d{d}", f"syn{d}", f"h{d}"), recs)
    build_s = time.time() - t0
    r = Retriever(store, emb, RagConfig(data_dir=workdir, embed_model=emb.model_path))
    t0 = time.time()
    r.retrieve("scale", questions[0]["query"], k=5)  # first query builds the BM25 index
    bm25_build_s = time.time() - t0
    lat, cpu = [], []
    queries = (questions * (n_queries // len(questions) + 1))[:n_queries]
    for q in queries:
        t0, c0 = time.perf_counter(), time.process_time()
        r.retrieve("scale", q["query"], k=5)
        lat.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    stages = stage_times(r, store, queries[:100])
    store.close()
    p = lambda xs, q: round(float(np.percentile(xs, q)), 2)  # noqa: E731
    return {"chunks": n, "index": "ivf" if ann_threshold else "exact", "store_build_s": round(build_s, 1),
            "bm25_build_s": round(bm25_build_s, 2), "queries": len(lat), "p50_ms": p(lat, 50), "p99_ms": p(lat, 99),
            "cpu_p50_ms": p(cpu, 50), "cpu_p99_ms": p(cpu, 99), "stage_p50_ms": stages}


def stage_times(r: Retriever, store, queries) -> dict:
    """Return the wall-time p50 (ms) of each stage of the retrieval pipeline, run one by one."""
    from servelm.rag.reranker import Hit, annotate
    from servelm.rag.retriever import rrf

    t = {s: [] for s in ("embed_query", "faiss", "bm25", "rrf", "fetch_chunks", "rerank")}
    for q in queries:
        marks = [time.perf_counter()]
        qv = r.embedder.embed_query(q["query"])
        marks.append(time.perf_counter())
        dense = [i for i, _ in store.search("scale", qv, r.cfg.fetch_k)]
        marks.append(time.perf_counter())
        lexical = [i for i, _ in r.bm25("scale").search(q["query"], r.cfg.fetch_k)]
        marks.append(time.perf_counter())
        fused = rrf([dense, lexical], r.cfg.rrf_k)[:r.cfg.fetch_k]
        marks.append(time.perf_counter())
        hits = [Hit(c) for c in store.get_chunks("scale", [i for i, _ in fused], vectors=True)]
        marks.append(time.perf_counter())
        annotate(qv, hits)
        r.reranker.rerank(q["query"], qv, hits)
        marks.append(time.perf_counter())
        for s, a, b in zip(t, marks, marks[1:]):
            t[s].append((b - a) * 1000)
    return {s: round(float(np.median(v)), 2) for s, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--articles", type=int, default=40)
    ap.add_argument("--per-article", type=int, default=15)
    ap.add_argument("--terms", type=int, default=6)
    ap.add_argument("--scale", type=int, default=100_000)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--skip-quality", action="store_true", help="only the latency run (no pipelines compared)")
    ap.add_argument("--ann-threshold", type=int, default=0,
                    help="latency run: FAISS IVF from this many chunks (0: exact)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the embedder (see docs/rag.md)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = args.workdir or tempfile.mkdtemp(prefix="rag-eval-")
    emb = Embedder(default_embed_model(), cache=EmbeddingCache(os.path.join(workdir, "emb-cache.sqlite")),
                   threads=args.threads)
    articles = wiki_articles(args.articles)
    questions = make_questions(articles, args.per_article, args.terms)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
           "load_avg_at_start": os.getloadavg()[0], "torch_threads": args.threads,
           "corpus": {"articles": len(articles), "chars": sum(len(t) for _, t in articles), "questions": len(questions),
                      "example_questions": [q["query"] for q in questions[:3]]},
           "pipelines": {}}
    if not args.skip_quality:
        res["pipelines"]["langchain-1000"] = langchain_pipeline(articles, questions, emb, 1000, 200)
        res["pipelines"]["langchain-2000"] = langchain_pipeline(articles, questions, emb, 2000, 200)
        res["pipelines"].update(servelm_pipelines(articles, questions, emb, workdir))
        best_lc = max(res["pipelines"][p]["recall@5"] for p in ("langchain-1000", "langchain-2000"))
        default = res["pipelines"]["servelm-hybrid+rerank (default)"]["recall@5"]
        res["recall@5_gain_points_vs_best_langchain"] = round(100 * (default - best_lc), 1)
    if args.scale:
        vocab = sorted({w.lower() for _, t in articles for w in _WORD.findall(t)})
        res["latency"] = latency_at_scale(args.scale, questions, emb, workdir, vocab, ann_threshold=args.ann_threshold)
    for p in res["pipelines"].values():
        for k, v in p.items():
            if isinstance(v, float):
                p[k] = round(v, 4)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
