"""Sentence embeddings with sentence-transformers (all-MiniLM-L6-v2 by default, 384 dimensions).

Texts and token-id lists take one path: text is tokenized, ids are wrapped in the same special tokens
([CLS] ... [SEP] for BERT models), and both run through the model as ids. So embedding
``tokenize(text)`` gives the vector of ``text``.
"""
from __future__ import annotations

import asyncio
import os

import numpy as np

MAX_INPUTS = 256
_BATCH = 32


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
        self.tokenizer = self.model.tokenizer
        self.vocab_size = len(self.tokenizer)
        self.max_tokens = int(self.model.max_seq_length)  # special tokens included
        # The special tokens the tokenizer puts around a text: what a one-word text gains with them.
        body = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next(i for i in range(len(full)) if full[i:i + len(body)] == body)
        self.prefix, self.suffix = full[:at], full[at + len(body):]
        self._lock = asyncio.Lock()  # one batch at a time: torch already uses every core

    def tokenize(self, text: str) -> list[int]:
        """Returns the ids the model reads for ``text``, special tokens included, never truncated."""
        # verbose=False: transformers would print a plain-text "sequence length is longer" warning
        # for long texts; the route answers those with a 400 or truncates them itself.
        return self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    def wrap(self, ids: list[int]) -> list[int]:
        """Returns ``ids`` inside the model's special tokens, as :meth:`tokenize` gives them for a text;
        ids that already carry them are returned as they are."""
        p, s = self.prefix, self.suffix
        if len(ids) >= len(p) + len(s) and ids[:len(p)] == p and ids[len(ids) - len(s):] == s:
            return list(ids)
        return p + list(ids) + s

    def truncate(self, ids: list[int], limit: int, keep: str) -> list[int]:
        """Returns wrapped ``ids`` cut to ``limit`` tokens with their special tokens kept; ``keep`` is
        "first" (TEI's truncate) or "last" (vLLM's truncate_prompt_tokens)."""
        if len(ids) <= limit:
            return ids
        p, s = len(self.prefix), len(self.suffix)
        body = ids[p:len(ids) - s]
        room = max(0, limit - p - s)
        body = body[:room] if keep == "first" else body[len(body) - room:]
        return self.prefix + body + self.suffix

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Returns one L2-normalised vector per id list (lists from :meth:`tokenize`/:meth:`wrap`)."""
        async with self._lock:
            arr = await asyncio.to_thread(self._encode, inputs)
        return arr.tolist()

    def _encode(self, inputs: list[list[int]]) -> np.ndarray:
        import torch

        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))  # less padding per batch
        out = np.zeros((len(inputs), self.dim), np.float32)
        pad = self.tokenizer.pad_token_id or 0
        for b in range(0, len(order), _BATCH):
            rows = order[b:b + _BATCH]
            n = max(len(inputs[i]) for i in rows)
            ids = torch.full((len(rows), n), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), n), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(inputs[i])] = torch.tensor(inputs[i])
                mask[r, :len(inputs[i])] = 1
            features = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.tokenizer.model_input_names:
                features["token_type_ids"] = torch.zeros_like(ids)
            with torch.inference_mode():
                vec = self.model(features)["sentence_embedding"]
            out[rows] = torch.nn.functional.normalize(vec.float(), dim=-1).numpy()
        return out
