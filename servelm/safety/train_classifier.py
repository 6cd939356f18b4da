"""Train the shipped guard classifiers from packaged, openly licensed data.

    python -m servelm.safety.train_classifier            # writes servelm/safety/models/*.json

Trains on the *train* side of :func:`servelm.safety.corpus.load_task` only; the held-out
side is left for ``bench/guard_eval.py``. The decision threshold is picked by 5-fold
cross-validation on the training data for a false-positive rate of at most ``--target-fpr``.
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ARTIFACT_DIR)
    ap.add_argument("--C", type=float, default=4.0)
    ap.add_argument("--target-fpr", type=float, default=0.02)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for task in ("injection", "harmful"):
        art = train(task, args.C, args.target_fpr)
        (args.out / f"{task}.json").write_text(json.dumps(art))


if __name__ == "__main__":
    main()
