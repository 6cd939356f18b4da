"""RAG ingest throughput: servelm (this tree and a baseline checkout) and LangChain, same corpus, same run.

Each measurement is a fresh subprocess with an empty embedding cache; the model is loaded and warmed
before the clock starts. Rounds interleave the pipelines (rotating their order) so that load from
other processes on a shared machine falls on all of them alike; per-round ratios are reported next
to the medians. Prints one JSON object.

Pipelines, same embedder (all-MiniLM-L6-v2 through sentence-transformers) and torch threads:
  servelm            this tree's ``RagService.ingest_paths`` over a directory of .txt files (load, split,
                     embed chunks and their sentences, store in SQLite + FAISS)
  servelm-baseline   the same call in another checkout (``--baseline DIR``, e.g. an older commit)
  langchain          RecursiveCharacterTextSplitter(1000, 200) + ``SentenceTransformer.encode`` (what
                     LangChain's HuggingFaceEmbeddings calls; chunks over 256 tokens are truncated)
                     + FAISS IndexFlatIP

    HF_HUB_OFFLINE=1 python3 bench/rag_ingest.py --baseline /path/to/old/checkout [--chars 60000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus(chars: int) -> list[str]:
    """Return the first articles of gensim's Wikipedia excerpt, cut to ``chars`` characters in all."""
    sys.path.insert(0, HERE)
    from bench.rag_eval import wiki_articles

    out, n = [], 0
    for _, text in wiki_articles(200):
        out.append(text[:chars - n])
        n += len(out[-1])
        if n >= chars:
            break
    return out


def worker(pipeline: str, root: str, docs: str, threads: int, jobs: int) -> dict:
    """Ingest ``docs`` with one pipeline in this process; returns its timings."""
    sys.path.insert(0, root)
    import torch

    torch.set_num_threads(threads)
    texts = [open(os.path.join(docs, f)).read() for f in sorted(os.listdir(docs))]
    chars = sum(len(t) for t in texts)
    if pipeline == "langchain":
        import faiss
        from langchain_text_splitters import RecursiveCharacterTextSplitter
        from sentence_transformers import SentenceTransformer

        from servelm.rag.config import default_embed_model

        model = SentenceTransformer(default_embed_model(), device="cpu", local_files_only=True)
        model.encode(["warm up"])
        t0 = time.perf_counter()
        sp = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=200)
        chunks = [d.page_content for t in texts for d in sp.create_documents([t])]
        vecs = model.encode(chunks, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        seconds = time.perf_counter() - t0
    else:
        from servelm.rag.config import RagConfig
        from servelm.rag.service import RagService

        data = tempfile.mkdtemp(prefix="ingest-bench-")
        svc = RagService(RagConfig(data_dir=data))
        svc.embedder.embed_query("warm up")
        kw = {"jobs": jobs} if pipeline == "servelm" else {}
        t0 = time.perf_counter()
        report = svc.ingest_paths("bench", [docs], progress=False, **kw)
        seconds = time.perf_counter() - t0
        chunks = [None] * report.chunks
        svc.close()
    return {"chars": chars, "chunks": len(chunks), "seconds": round(seconds, 2),
            "chars_per_s": round(chars / seconds), "chunks_per_s": round(len(chunks) / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="", help="another servelm checkout to compare with (skipped if empty)")
    ap.add_argument("--chars", type=int, default=60_000, help="corpus size in characters")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every pipeline (docs/rag.md)")
    ap.add_argument("--jobs", type=int, default=1, help="servelm ingest --jobs")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--root", default="", help=argparse.SUPPRESS)
    ap.add_argument("--docs", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.root, args.docs, args.threads, args.jobs)))
        return
    docs = tempfile.mkdtemp(prefix="ingest-corpus-")
    for i, text in enumerate(corpus(args.chars)):
        with open(os.path.join(docs, f"{i:03d}.txt"), "w") as f:
            f.write(text)
    pipelines = {"servelm": HERE, "langchain": HERE}
    if args.baseline:
        pipelines["servelm-baseline"] = os.path.abspath(args.baseline)
    names = list(pipelines)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
           "command": " ".join(sys.argv), "load_avg_at_start": os.getloadavg()[0], "torch_threads": args.threads,
           "jobs": args.jobs, "runs": {n: [] for n in names}}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", n, "--root", pipelines[n], "--docs", docs,
                   "--threads", str(args.threads), "--jobs", str(args.jobs)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=pipelines[n],
                                 env=dict(os.environ, PYTHONPATH=pipelines[n]))
            if out.returncode:
                res["runs"][n].append({"error": out.stderr[-2000:]})
                continue
            res["runs"][n].append({**json.loads(out.stdout.strip().splitlines()[-1]), "round": r,
                                   "load_avg": os.getloadavg()[0]})
    ok = {n: [x for x in runs if "error" not in x] for n, runs in res["runs"].items()}
    res["corpus"] = {"chars": next((x["chars"] for v in ok.values() for x in v), 0), "files": len(os.listdir(docs))}
    res["median_chars_per_s"] = {n: statistics.median(x["chars_per_s"] for x in v) for n, v in ok.items() if v}
    for other in ("servelm-baseline", "langchain"):
        pairs = [(a["chars_per_s"], b["chars_per_s"]) for a in ok.get("servelm", []) for b in ok.get(other, [])
                 if a["round"] == b["round"]]
        if pairs:
            res[f"speedup_vs_{other}_per_round"] = [round(a / b, 2) for a, b in pairs]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
