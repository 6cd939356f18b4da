"""A small learned text classifier that runs offline: logistic regression over hashed n-grams and,
where the artifact says so, a sentence embedding (``servelm.safety.embedding``).

Why this model: the n-gram part is ~0.3 ms per request on one CPU core, needs no download, and its
artifact (a JSON file of float16 weights, a few hundred KB) is committed next to this
file together with ``train_classifier.py`` that reproduces it from packaged data. The embedding part
(artifact ``features`` "ngram+minilm") generalises to attacks phrased unlike any training source, at
the cost of one MiniLM forward pass per scored text.
Long inputs are scored on the whole text *and* on overlapping windows and sentence runs, so one
injected sentence inside a long retrieved document is not diluted away.
"""
from __future__ import annotations

import base64
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix, hstack
from sklearn.feature_extraction.text import HashingVectorizer

ARTIFACT_DIR = Path(__file__).parent / "models"
N_FEATURES = 2**16
WINDOW, STRIDE = 400, 200
SENTENCE_WINDOW = 240


def make_vectorizers() -> tuple[HashingVectorizer, HashingVectorizer]:
    """Return the (char, word) feature hashers shared by training and inference."""
    char = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), n_features=N_FEATURES,
                             alternate_sign=False, lowercase=True)
    word = HashingVectorizer(analyzer="word", ngram_range=(1, 2), n_features=N_FEATURES,
                             alternate_sign=False, lowercase=True, token_pattern=r"(?u)\b\w+\b")
    return char, word


# Cues that tell an instruction about the *answer* (its format, language, length) from one that
# *overrides the instructions before it*. N-grams alone learned "from now on" and "respond only" as attack
# words, since jailbreaks use them too; these let the model weigh what the instruction is about.
_FORMAT_WORDS = (r"(?:json|yaml|xml|markdown|csv|html|tables?|bullets?|bullet\s+points|lists?|lowercase|uppercase|"
                 r"capital(?:s|\s+letters)?|words?|sentences?|paragraphs?|lines?|english|french|spanish|german|"
                 r"italian|portuguese|chinese|japanese|korean|russian|arabic|hindi|\w+\s+language|haiku|poem|rhymes?|"
                 r"tone|style|format|emojis?|title|quotation\s+marks|commas?)")
CUES = {
    "answer_format": re.compile(r"\b(?:respond|answer|reply|write|output|format|use|include|wrap|end|start|"
                                r"(?:your|the)\s+(?:entire\s+)?(?:response|answer|output|reply))\b[^.\n]{0,50}?\b"
                                + _FORMAT_WORDS + r"\b", re.IGNORECASE),
    "override_prior": re.compile(r"\b(?:ignore|disregard|forget|override|bypass|abandon|discard)\b[^.\n]{0,40}?\b"
                                 r"(?:previous|prior|above|earlier|preceding|original|initial|system|all|your)\b"
                                 r"[^.\n]{0,25}?\b(?:instructions?|prompts?|rules?|guidelines?|directives?|"
                                 r"programming|restrictions?|polic(?:y|ies)|training)\b", re.IGNORECASE),
    "rules_removed": re.compile(r"\b(?:no|without|free\s+(?:of|from)|not\s+bound\s+by|break(?:s|ing)?|ignores?)\s+"
                                r"(?:any\s+|the\s+|all\s+)?(?:rules|restrictions|limits|limitations|filters?|"
                                r"censorship|guidelines|ethics|morals|content\s+polic(?:y|ies)|safety)\b",
                                re.IGNORECASE),
    "reveal_prompt": re.compile(r"\b(?:system\s+prompt|initial\s+instructions|hidden\s+instructions|"
                                r"instructions\s+(?:above|you\s+were\s+given))\b", re.IGNORECASE),
}


def cue_features(texts: list[str]) -> csr_matrix:
    """Return one 0/1 column per cue in :data:`CUES`."""
    return csr_matrix(np.array([[1.0 if rx.search(t) else 0.0 for rx in CUES.values()] for t in texts],
                               np.float64).reshape(len(texts), len(CUES)))


def featurize(texts: list[str], vecs=None, features: str = "ngram"):
    """Return the sparse feature matrix for ``texts``: hashed char and word n-grams, then the cues, then
    (``features`` "ngram+minilm") the MiniLM sentence embedding."""
    char, word = vecs or make_vectorizers()
    parts = [char.transform(texts), word.transform(texts), cue_features(texts)]
    for extra in features.split("+")[1:]:
        from servelm.safety.embedding import embed

        parts.append(csr_matrix(np.asarray(embed(texts, extra), np.float64)))
    return hstack(parts).tocsr()


_SENTENCE_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+|\n+")


def sentence_windows(text: str, width: int = SENTENCE_WINDOW) -> list[str]:
    """Return runs of consecutive sentences of up to ``width`` characters, one starting at each sentence.

    Fixed character windows still carry ~300 characters of surrounding text, which dilutes a one-sentence
    injection in a pasted document below the threshold; sentence runs keep it nearly alone (LLM Guard's
    ``match_type=SENTENCE`` does the same)."""
    sents = [s for s in _SENTENCE_END.split(text) if s.strip()]
    out = []
    for i in range(len(sents)):
        run, j = sents[i], i + 1
        while j < len(sents) and len(run) + len(sents[j]) < width:
            run, j = f"{run} {sents[j]}", j + 1
        out.append(run)
    return out


def windows(text: str) -> list[str]:
    """Return ``text`` plus, when it is long, overlapping character windows and sentence runs of it."""
    if len(text) <= WINDOW + STRIDE:
        return [text]
    return [text] + [text[i:i + WINDOW] for i in range(0, len(text) - STRIDE, STRIDE)] + sentence_windows(text)


class TextClassifier:
    """Loads a trained artifact; :meth:`score` returns P(positive) in [0, 1]."""

    def __init__(self, artifact: dict):
        self.name = artifact["name"]
        self.meta = artifact.get("meta", {})
        self.threshold = float(artifact["threshold"])
        self.features = artifact.get("features", "ngram")
        raw = base64.b64decode(artifact["coef_f16_b64"])
        self.coef = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        self.intercept = float(artifact["intercept"])
        self._vecs = make_vectorizers()

    @classmethod
    def load(cls, name: str, directory: Path = ARTIFACT_DIR) -> "TextClassifier":
        """Return the classifier stored as ``<directory>/<name>.json``; raises FileNotFoundError."""
        path = Path(directory) / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"classifier artifact {path} missing: run python -m servelm.safety.train_classifier")
        return cls(json.loads(path.read_text()))

    def score_batch(self, texts: list[str]) -> list[float]:
        """Return P(positive) for each text (whole text, no windows)."""
        x = featurize(texts, self._vecs, self.features)
        z = x @ self.coef + self.intercept
        return list(1.0 / (1.0 + np.exp(-z)))

    def score(self, text: str) -> float:
        """Return the highest P(positive) over ``text`` and its windows."""
        return max(self.score_batch(windows(text)))


@lru_cache(maxsize=8)
def load_classifier(name: str) -> TextClassifier:
    """Return the shipped classifier ``name`` ("injection" or "harmful"), loaded once."""
    return TextClassifier.load(name)


def to_artifact(name: str, coef: np.ndarray, intercept: float, threshold: float, meta: dict,
                features: str = "ngram") -> dict:
    """Return the JSON-serialisable artifact for a trained linear model over ``features``."""
    return {"name": name, "threshold": threshold, "intercept": float(intercept), "meta": meta, "features": features,
            "coef_f16_b64": base64.b64encode(np.asarray(coef, dtype=np.float16).tobytes()).decode()}
