"""Sentence embeddings with sentence-transformers (all-MiniLM-L6-v2 by default, 384 dimensions)."""
from __future__ import annotations

import asyncio
import os

MAX_INPUTS = 256


class Embedder:
    """A loaded embedding model. ``embed`` runs in a worker thread, one batch at a time."""

    def __init__(self, path: str, name: str):
        # Imported here: sentence-transformers pulls in a lot and only this feature needs it.
        from sentence_transformers import SentenceTransformer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = SentenceTransformer(path, device="cpu", local_files_only=True)
        self.name = name
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim()
        self.max_tokens = self.model.max_seq_length
        self._lock = asyncio.Lock()  # one batch at a time: torch already uses every core

    def count_tokens(self, texts: list[str]) -> int:
        """Returns the tokens the model reads for ``texts`` (after truncation to its window)."""
        ids = self.model.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return sum(min(len(x), self.max_tokens) for x in ids)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Returns one L2-normalised vector per text."""
        async with self._lock:
            arr = await asyncio.to_thread(self.model.encode, texts, batch_size=32, normalize_embeddings=True,
                                          convert_to_numpy=True, show_progress_bar=False)
        return arr.tolist()
