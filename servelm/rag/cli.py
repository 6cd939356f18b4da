"""``servelm ingest PATH... --collection NAME``: put files into a RAG collection."""
from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers) -> None:
    """Add the ``ingest`` sub-command to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("ingest", help="add files or directories to a RAG collection")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories (recursive)")
    p.add_argument("--collection", required=True, help="collection name (created if missing)")
    p.add_argument("--data-dir", default="", help="servelm's data directory, as for 'servelm serve'; collections go "
                   "to <data-dir>/rag (default $SERVELM_DATA_DIR, else ~/.local/share/servelm)")
    p.add_argument("--rag-data-dir", default="", help="where collections live, as for 'servelm serve' (default <data-dir>/rag)")
    p.add_argument("--chunk-size", type=int, default=500, help="chunk size in embedding tokens (default: 500)")
    p.add_argument("--chunk-overlap", type=int, default=50, help="overlap in embedding tokens (default: 50)")
    p.add_argument("--embed-model", default="", help="local sentence-transformers model directory (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--store", choices=["faiss", "pgvector"], default="faiss", help="where vectors go (default: faiss)")
    p.add_argument("--pg-url", dest="pg_dsn", default="", help="postgresql://... for --store pgvector, as for 'servelm serve' (default: none)")
    p.add_argument("--pg-dsn", dest="pg_dsn", help=argparse.SUPPRESS)  # the old name; one name across commands
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="CPU threads: files loaded and split in parallel, and threads of the embedding model "
                        "(default: every core, %(default)s here; 1 on a machine busy with other work)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (chunks, chunks/s, files)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Ingest and print the JSON report; returns 1 if any file failed (the rest are ingested)."""
    from servelm.paths import default_rag_dir
    from servelm.rag.config import RagConfig
    from servelm.rag.service import RagService

    try:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
        svc = RagService(RagConfig(data_dir=args.rag_data_dir or default_rag_dir(args.data_dir), embed_model=args.embed_model, chunk_size=args.chunk_size,
                                   chunk_overlap=args.chunk_overlap, store=args.store, pg_dsn=args.pg_dsn,
                                   embed_threads=args.jobs))
        report = svc.ingest_paths(args.collection, args.paths, progress=not args.no_progress, jobs=args.jobs)
        svc.close()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1))
    for r in report.errors:
        print(f"error: {r.error}", file=sys.stderr)
    return 1 if report.errors else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m servelm.rag.cli PATH... --collection NAME``."""
    parser = argparse.ArgumentParser(prog="servelm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ingest", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
