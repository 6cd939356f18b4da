"""Precision and recall of the output guard's default PII/secret redaction, Presidio-evaluator style; print JSON.

    HF_HUB_OFFLINE=1 python3 bench/pii_eval.py [--samples 600] [--benign 200] [--seed 42]

The set is generated (Faker, seeded) in the manner of presidio-evaluator: templates filled with values of
known spans. Sentences that must be redacted carry the default entities (API keys and tokens, passwords,
private keys, payment cards, US SSNs, IBANs, e-mail addresses, phone numbers) among real public figures,
places, dates and ZIP codes, which must be left alone; the benign set is ordinary answers about history,
geography and people. Entity-level scores: a gold span is found when a predicted span of its type covers
it (within one character); a predicted span that overlaps no gold span is a false positive. The benign
set reports how many answers the guard changed at all (the goal is none).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PUBLIC_FIGURES = [
    "George Washington", "Abraham Lincoln", "Marie Curie", "Leonardo da Vinci", "Albert Einstein",
    "Ada Lovelace", "Nelson Mandela", "Queen Victoria", "Napoleon Bonaparte", "Cleopatra", "Isaac Newton",
    "Frida Kahlo", "Mahatma Gandhi", "Winston Churchill", "Martin Luther King Jr.", "Amelia Earhart",
    "Wolfgang Amadeus Mozart", "Charles Darwin", "Jane Austen", "William Shakespeare", "Neil Armstrong",
    "Rosa Parks", "Galileo Galilei", "Simón Bolívar", "Thomas Jefferson", "Catherine the Great",
    "Vincent van Gogh", "Florence Nightingale", "Alan Turing", "Harriet Tubman",
]
PLACES = [
    "Paris", "Mount Everest", "the Nile", "Tokyo", "Beverly Hills", "Washington, D.C.", "the Amazon rainforest",
    "Lake Baikal", "Cape Town", "Buenos Aires", "the Sahara", "Reykjavik", "Mount Kilimanjaro", "Venice",
    "the Grand Canyon", "Kyoto", "New York City", "Istanbul", "the Great Barrier Reef", "Lima",
]
WORKS = ["the Mona Lisa", "Hamlet", "Pride and Prejudice", "the theory of relativity", "On the Origin of Species",
         "The Starry Night", "the Declaration of Independence", "the Magic Flute"]

BENIGN = [
    "{FIG} was born on {DATE} and is remembered for {WORK}.",
    "The first president of the United States was George Washington, who served from 1789 to 1797.",
    "{FIG} lived in {PLACE} for several years before {YEAR}.",
    "{PLACE} is home to about {POP} people, and its ZIP code is {ZIP}.",
    "The White House is at 1600 Pennsylvania Avenue NW, Washington, DC 20500.",
    "{FIG} met {FIG2} in {YEAR}, according to several biographies.",
    "Who painted the Mona Lisa? Leonardo da Vinci painted it between 1503 and {YEAR}.",
    "The address on the old letter reads {ADDRESS}.",
    "{PLACE} lies at {LAT}, {LON}, roughly {KM} km from the coast.",
    "On {DATE}, {FIG} gave a speech that was printed by {COMPANY}.",
    "Hi, I'm your assistant. {FIG} is often quoted on this topic.",
    "The museum in {CITY}, {STATE} {ZIP} displays letters by {FIG} dated {DATE}.",
    "Between {YEAR} and {YEAR2}, the population of {PLACE} grew by {PCT}%.",
    "The book about {FIG} has ISBN {ISBN} and {PAGES} pages.",
    "{FIG} died on {DATE} at the age of {AGE}; the funeral was held in {PLACE}.",
    "The mountain is {HEIGHT} metres high and was first climbed on {DATE}.",
    "{COMPANY} was founded in {CITY} in {YEAR} by {FIG}'s descendants.",
    "The event started at {TIME} on {DATE}, version {VERSION} of the schedule says.",
]

PII = [
    "Please contact {FIG}'s archive at {EMAIL_ADDRESS} for a copy of the letter from {DATE}.",
    "You can reach the museum in {PLACE} on {PHONE_NUMBER} after 5pm.",
    "The card on file is {CREDIT_CARD}, expiring in {YEAR}.",
    "Transfer the deposit for the {PLACE} trip to IBAN {IBAN_CODE} by {DATE}.",
    "Applicant SSN: {US_SSN}. Applicant lives at ZIP {ZIP}.",
    "Use the key {API_KEY} for the staging deployment in {CITY}.",
    "The database password: {PASSWORD} (rotated on {DATE}).",
    "{FIG} fan club: write to {EMAIL_ADDRESS} or call {PHONE_NUMBER}.",
    "Customer in {CITY}, {STATE} {ZIP} (card {CREDIT_CARD}) disputed the charge.",
    "The server in {PLACE} rejected token {API_KEY}.",
    "My social security number is {US_SSN} and my phone is {PHONE_NUMBER}.",
    "Send the invoice about {WORK} to {EMAIL_ADDRESS}; pay into {IBAN_CODE}.",
    "Here is the deploy key:\n{PRIVATE_KEY}\nKeep it next to the notes on {FIG}.",
    "Payment of {YEAR} dollars failed for {CREDIT_CARD}; the office in {PLACE} will retry.",
    "Login with api_key={API_KEY} and secret: {PASSWORD} before {TIME}.",
]
ENTITY_OF = {"PASSWORD": "API_KEY", "PRIVATE_KEY": "API_KEY"}


def _values(fake, rng: random.Random) -> dict:
    import phonenumbers

    alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def phone():
        while True:
            n = rng.choice(["({a}) {b}-{c}", "{a}-{b}-{c}", "+1 {a} {b} {c}", "{a}.{b}.{c}", "+44 20 {b}{d} {c}",
                            "+33 1 {e} {e} {e} {e}"]).format(
                a=rng.randint(201, 989), b=rng.randint(200, 999), c=f"{rng.randint(0, 9999):04d}",
                d=rng.randint(0, 9), e=f"{rng.randint(10, 99)}")
            if phonenumbers.is_valid_number(phonenumbers.parse(n, "US")):  # "+44 ..." parses as GB
                return n

    def api_key():
        return rng.choice([
            "sk-proj-" + "".join(rng.choice(alnum) for _ in range(32)),
            "ghp_" + "".join(rng.choice(alnum) for _ in range(36)),
            "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
            "xoxb-" + "-".join("".join(rng.choice("0123456789") for _ in range(12)) for _ in range(2)),
            "hf_" + "".join(rng.choice(alnum) for _ in range(34)),
        ])

    def private_key():
        body = "\n".join("".join(rng.choice(alnum + "+/") for _ in range(64)) for _ in range(4))
        return f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----"

    return {
        "FIG": lambda: rng.choice(PUBLIC_FIGURES), "FIG2": lambda: rng.choice(PUBLIC_FIGURES),
        "PLACE": lambda: rng.choice(PLACES), "WORK": lambda: rng.choice(WORKS),
        "DATE": lambda: rng.choice([fake.date("%B %d, %Y"), fake.date("%d %B %Y"), fake.date("%Y-%m-%d")]),
        "YEAR": lambda: str(rng.randint(1500, 2024)), "YEAR2": lambda: str(rng.randint(1500, 2024)),
        "POP": lambda: f"{rng.randint(10_000, 40_000_000):,}", "ZIP": lambda: rng.choice([fake.zipcode(),
                                                                                         fake.zipcode_plus4()]),
        "ADDRESS": lambda: fake.address().replace("\n", ", "), "LAT": lambda: str(fake.latitude()),
        "LON": lambda: str(fake.longitude()), "KM": lambda: str(rng.randint(2, 900)), "COMPANY": fake.company,
        "CITY": fake.city, "STATE": fake.state_abbr, "PCT": lambda: f"{rng.uniform(1, 90):.1f}",
        "ISBN": fake.isbn13, "PAGES": lambda: str(rng.randint(90, 900)), "AGE": lambda: str(rng.randint(30, 99)),
        "HEIGHT": lambda: f"{rng.randint(1000, 8848):,}", "TIME": lambda: fake.time("%H:%M"),
        "VERSION": lambda: f"{rng.randint(1, 20)}.{rng.randint(0, 99)}.{rng.randint(0, 300)}",
        "EMAIL_ADDRESS": fake.email, "PHONE_NUMBER": phone, "IBAN_CODE": fake.iban, "US_SSN": fake.ssn,
        "CREDIT_CARD": lambda: fake.credit_card_number(card_type=rng.choice(["visa16", "mastercard", "amex",
                                                                             "discover"])),
        "API_KEY": api_key, "PRIVATE_KEY": private_key,
        "PASSWORD": lambda: "".join(rng.choice(alnum + "!#%&*") for _ in range(rng.randint(10, 18))),
    }


def _fill(tpl: str, gens: dict, gold_entities: set[str]) -> tuple[str, list[tuple[str, int, int]]]:
    text, spans, pos = "", [], 0
    for m in re.finditer(r"\{(\w+)\}", tpl):
        text += tpl[pos:m.start()]
        value = gens[m.group(1)]()
        entity = ENTITY_OF.get(m.group(1), m.group(1))
        if entity in gold_entities:
            spans.append((entity, len(text), len(text) + len(value)))
        text += value
        pos = m.end()
    return text + tpl[pos:], spans


def generate(samples: int, benign: int, seed: int = 42):
    """Returns ``(labelled, benign)``: ``samples`` (text, [(entity, start, end)]) with the default entities
    among public figures, places and dates, and ``benign`` ordinary answers with nothing to redact."""
    from faker import Faker

    from servelm.safety.pii import DEFAULT_ENTITIES

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    gens = _values(fake, rng)
    labelled = [_fill(PII[i % len(PII)], gens, set(DEFAULT_ENTITIES)) for i in range(samples)]
    plain = [_fill(BENIGN[i % len(BENIGN)], gens, set())[0] for i in range(benign)]
    return labelled, plain


def score(guard, labelled, plain) -> dict:
    """Returns entity-level precision/recall of ``guard``'s output redaction, and its changes to ``plain``."""
    tp = fn = fp = 0
    per: dict[str, list[int]] = {}
    false_positives, misses = [], []
    for text, gold in labelled:
        pred = _spans(guard, text)
        used = set()
        for ent, a, b in gold:
            stats = per.setdefault(ent, [0, 0])
            stats[0] += 1
            hit = [i for i, (pe, pa, pb) in enumerate(pred) if pe == ent and pa <= a + 1 and pb >= b - 1]
            if hit:
                tp += 1
                stats[1] += 1
                used.update(hit)
            else:
                fn += 1
                misses.append((ent, text[a:b]))
        for i, (pe, pa, pb) in enumerate(pred):
            if i not in used and not any(pa < b and pb > a for _, a, b in gold):
                fp += 1
                false_positives.append((pe, text[pa:pb]))
    changed = [t for t in plain if guard.check_output(t).text != t]
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"samples": len(labelled), "entities": tp + fn, "precision": round(prec, 4), "recall": round(rec, 4),
            "tp": tp, "fp": fp, "fn": fn,
            "recall_by_entity": {k: round(v[1] / v[0], 4) for k, v in sorted(per.items())},
            "false_positives": false_positives[:20], "misses": misses[:20],
            "benign_answers": len(plain), "benign_changed": len(changed), "benign_changed_examples": changed[:10]}


def _spans(guard, text: str) -> list[tuple[str, int, int]]:
    """The spans the guard's output pii scanner redacts in ``text`` under its default policy."""
    from servelm.safety.pii import DEFAULT_ENTITIES, get_pii_detector, not_supplied

    sp = guard.policy.scanner("pii")
    entities = tuple(sp.entities) if sp.entities else DEFAULT_ENTITIES
    return [(s.entity, s.start, s.end)
            for s in not_supplied(text, get_pii_detector().detect(text, entities, sp.threshold), "")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--benign", type=int, default=200)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    import logging

    from prometheus_client import CollectorRegistry

    from servelm.safety import Guard
    from servelm.safety.pii import DEFAULT_ENTITIES

    logging.getLogger("servelm.safety").setLevel(logging.WARNING)
    policy = Path(__file__).resolve().parents[1] / "servelm" / "safety" / "policies" / "default.yaml"
    guard = Guard.from_policy(policy, registry=CollectorRegistry())
    labelled, plain = generate(args.samples, args.benign, args.seed)
    t0 = time.perf_counter()
    result = score(guard, labelled, plain)
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "command": "HF_HUB_OFFLINE=1 python3 bench/pii_eval.py " + " ".join(sys.argv[1:]),
        "policy": "servelm/safety/policies/default.yaml", "entities": list(DEFAULT_ENTITIES),
        "seconds": round(time.perf_counter() - t0, 2), **result}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
