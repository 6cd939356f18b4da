"""The shipped guard defaults: secrets and high-risk identifiers are redacted, ordinary answers are not."""
import pytest
from prometheus_client import CollectorRegistry

from bench.pii_eval import generate, score
from servelm.safety import Guard

POLICY = "servelm/safety/policies/default.yaml"


@pytest.fixture(scope="module")
def guard():
    g = Guard.from_policy(POLICY, registry=CollectorRegistry())
    g.warmup()
    return g


def test_generated_set_precision_recall_and_no_change_to_benign_answers(guard):
    # a faster version of bench/pii_eval.py (600 samples there): a new seed, 200 benign answers in full
    labelled, plain = generate(90, 200, seed=7)
    r = score(guard, labelled, plain)
    assert r["precision"] >= 0.95 and r["recall"] >= 0.95, r
    assert r["benign_changed"] == 0, r["benign_changed_examples"]


@pytest.mark.parametrize("text", [
    "The first president of the United States was George Washington.",
    "Who painted the Mona Lisa? Leonardo da Vinci. Leonardo da Vinci painted it; Leonardo da Vinci was Italian.",
    "Hi, I'm Ava, your assistant.",
    "Beverly Hills, CA 90210 and the White House, DC 20500-0003, are famous ZIP codes.",
    "Apollo 11 landed on July 20, 1969 at 20:17 UTC (1969-07-20T20:17:40.5).",
    "The server 10.0.0.1 answers on port 8080.",
])
def test_ordinary_answers_pass_unchanged(guard, text):
    d = guard.check_output(text)
    assert d.text == text and d.action == "allow"


def test_secrets_and_identifiers_redacted_with_a_count_per_kind(guard):
    text = ("Mail jane.doe@gmail.com or ring (415) 555-0132; card 4111 1111 1111 1111, SSN 536-22-1234, "
            "IBAN GB82 WEST 1234 5698 7654 32, password: Tr0ub4dor&3x, key sk-proj-abcdefghijklmnopqrstuvwxyz123456 "
            "and -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
            "-----END PRIVATE KEY----- ; a second mail bob@example.org.")
    d = guard.check_output(text)
    for secret in ("jane.doe", "555-0132", "4111", "536-22", "GB82", "Tr0ub4dor", "sk-proj", "MIIEvQ", "bob@"):
        assert secret not in d.text, secret
    assert d.redactions == [
        {"scanner": "pii", "kind": "API_KEY", "count": 3}, {"scanner": "pii", "kind": "CREDIT_CARD", "count": 1},
        {"scanner": "pii", "kind": "EMAIL_ADDRESS", "count": 2}, {"scanner": "pii", "kind": "IBAN_CODE", "count": 1},
        {"scanner": "pii", "kind": "PHONE_NUMBER", "count": 1}, {"scanner": "pii", "kind": "US_SSN", "count": 1}]


def test_contact_details_the_user_gave_are_repeated(guard):
    d = guard.check_output("I'll write to jane.doe@gmail.com and call 415-555-0132.",
                           supplied="my mail is jane.doe@gmail.com, phone 415-555-0132")
    assert d.text == "I'll write to jane.doe@gmail.com and call 415-555-0132."


def test_a_policy_that_asks_for_names_gets_them_redacted():
    g = Guard.from_policy({"scanners": {"pii": {"entities": ["PERSON", "EMAIL_ADDRESS"]}}},
                          registry=CollectorRegistry())
    assert "<PERSON>" in g.check_output("The first president was George Washington.").text
