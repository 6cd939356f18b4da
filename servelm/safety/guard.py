"""The guard facade the server calls: input check, output check, streaming output scanner.

    guard = Guard.from_policy("policy.yaml", review_db="reviews.sqlite")
    d = guard.check_input(user_text, request_id=rid, api_key=key)
    if d.action == "block":  -> HTTP 400, error.code "content_filter", message d.message (names d.scanner)
    if d.action == "review": -> answer d.held_response (contains d.review_id), don't generate
    prompt_text = d.text     # the (possibly secret-redacted) text to use

    d = guard.check_output(answer, request_id=rid)          # non-streamed
    d.text                   # redacted answer; d.action == "block" -> finish_reason "content_filter"

    s = guard.output_stream(request_id=rid)                 # streamed
    for delta in deltas: emit(s.feed(delta)); if s.blocked: finish_reason = "content_filter"
    emit(s.finish())

Actions rank block > review > redact > allow; the most severe finding decides.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import regex
from prometheus_client import CollectorRegistry

from servelm.safety.metrics import GuardMetrics, log_event
from servelm.safety.normalise import normalise
from servelm.safety.pii import DEFAULT_ENTITIES, KNOWN_ENTITIES, PiiSpan, get_pii_detector, not_supplied, redact
from servelm.safety.policy import Policy, PolicyError
from servelm.safety.review_queue import ReviewQueue, open_review_queue
from servelm.safety.scanners import (
    INPUT_SCANNERS, OUTPUT_SCANNERS, ScanContext, ScanResult, scan_harmful_output,
)
from servelm.safety.streaming import DEFAULT_HOLDS, NAME_HOLD, StreamingRedactor

def _clean(text) -> str:
    # Lone surrogates cannot be encoded as UTF-8 (so can't be sent either): replace them.
    text = text if isinstance(text, str) else str(text)
    return text.encode("utf-8", "replace").decode("utf-8")


_RANK = {"allow": 0, "redact": 1, "review": 2, "block": 3}
Scanner = Callable[[str, ScanContext], ScanResult]


@dataclass(slots=True)
class Finding:
    scanner: str
    score: float
    action: str
    reason: str
    error: bool = False


@dataclass(slots=True)
class Decision:
    """The guard's verdict. ``text`` is what may be used/sent (redacted where the policy says)."""

    action: str  # allow | redact | block | review
    text: str
    scanner: str | None = None  # the scanner that decided (for block/review)
    reason: str = ""
    findings: list[Finding] = field(default_factory=list)
    review_id: str | None = None
    held_response: str | None = None
    request_id: str | None = None
    # What a redaction replaced: [{"scanner": "pii", "kind": "EMAIL_ADDRESS", "count": 2}, ...]
    redactions: list[dict] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        """True when the text may go on (allowed as is, or redacted)."""
        return self.action in ("allow", "redact")

    @property
    def message(self) -> str:
        """A client-facing message naming the scanner, for HTTP 400 / content_filter."""
        if self.allowed:
            return ""
        verb = "blocked" if self.action == "block" else "held for review"
        return f"Content {verb} by the '{self.scanner}' guard: {self.reason}"


class Guard:
    """Runs the policy's scanners; share one per deployment (it is thread-safe)."""

    def __init__(self, policy: Policy, review_queue: ReviewQueue | None = None,
                 registry: CollectorRegistry | None = None):
        self.policy = policy
        self.metrics = GuardMetrics.get(registry)
        self.review_queue = review_queue
        if review_queue is not None:
            review_queue._on_depth = self.metrics.review_depth.set
            review_queue._report_depth()
        # The length limit of a policy that leaves max_input_chars "auto"; `servelm serve` raises it to
        # 8 characters per token of the served context window, so text that fits the model is not refused.
        self.default_max_input_chars = 32_000
        self.input_scanners: dict[str, Scanner] = dict(INPUT_SCANNERS)
        self.output_scanners: dict[str, Scanner] = dict(OUTPUT_SCANNERS)
        # What each added output scanner must hold back in a stream (see add_scanner); the shipped ones
        # have their own streamed form in GuardedStream.
        self.stream_holds: dict[str, int | None] = {}

    @classmethod
    def from_policy(cls, policy: Policy | dict | str | Path | None = None, review_db: str | Path | None = None,
                    registry: CollectorRegistry | None = None) -> "Guard":
        """Return a guard for ``policy`` (a Policy, a mapping, or a YAML file path; None = defaults).

        ``review_db`` is the review queue's SQLite file or ``postgresql://`` URL (None: "review" acts as "block").
        Raises :class:`~servelm.safety.policy.PolicyError` for an invalid policy.
        """
        if isinstance(policy, (str, Path)):
            policy = Policy.from_yaml(policy)
        elif isinstance(policy, dict) or policy is None:
            policy = Policy.from_dict(policy)
        queue = open_review_queue(review_db) if review_db is not None else None
        return cls(policy, queue, registry)

    def add_scanner(self, stage: str, name: str, fn: Scanner, hold: int | None = None) -> None:
        """Register a custom scanner for ``stage`` ("input" or "output"); configure it in the policy.

        An output scanner runs on whole answers and on streamed ones alike. ``hold`` is how many characters
        it must see together to find what it looks for (its longest match): a streamed answer keeps its
        last ``hold`` characters back until more text comes, and each piece is scanned with the text
        before it. ``None`` holds a streamed answer whole until it ends (right for a scanner that judges the
        answer as a whole, e.g. a classifier). Streamed, a redacting scanner's ``ScanResult.spans`` are
        replaced by ``<ENTITY>``; whole answers get its ``redacted`` text."""
        (self.input_scanners if stage == "input" else self.output_scanners)[name] = fn
        if stage != "input":
            self.stream_holds[name] = hold

    def warmup(self) -> None:
        """Load the classifiers now instead of on the first request, and Presidio/spaCy where the policy
        (the deployment's or a key's) runs the pii scanner; with it off everywhere they never load."""
        # The scanners run directly, not through a decision: a warm-up text that a strict policy flags must
        # not be filed in the review queue or counted as a request's decision.
        text = "warm up"
        ctx = ScanContext(normalised=normalise(text), max_input_chars=self.default_max_input_chars)
        for name, fn in self.input_scanners.items():
            if self.policy.scanner(name).enabled:
                try:
                    fn(text, ctx)
                except Exception:  # noqa: BLE001 - a broken scanner fails (and is logged) on real requests
                    pass
        for name, fn in self.output_scanners.items():
            if self.policy.scanner(name).enabled:
                try:
                    fn(text, ctx)
                except Exception:  # noqa: BLE001 - as above
                    pass
        if self.runs_pii():
            # Both analyzers (with and without spaCy NER) run once: their first call builds Presidio's
            # recogniser state, tens of milliseconds the first streamed answer would otherwise wait.
            detector = get_pii_detector()
            for entities in (DEFAULT_ENTITIES, KNOWN_ENTITIES):
                detector.detect("Warm up: Ada wrote to a@example.com.", entities)

    def runs_pii(self) -> bool:
        """True when the deployment's policy or some key's override runs the pii scanner."""
        return any(self._runs_pii(k) for k in [None, *self.policy.api_keys])

    def _runs_pii(self, api_key: str | None) -> bool:
        try:
            return self.policy.for_api_key(api_key).scanner("pii").enabled
        except PolicyError:  # a bad key override fails that key's requests, not the start: load to be safe
            return True

    def _policy(self, api_key: str | None, overrides: dict | None) -> Policy:
        p = self.policy.for_api_key(api_key)
        return p.merged(overrides) if overrides else p

    def _run(self, stage: str, scanners: dict[str, Scanner], text: str, ctx: ScanContext, policy: Policy,
             request_id: str | None) -> list[tuple[Finding, ScanResult | None]]:
        out = []
        for name, fn in scanners.items():
            sp = policy.scanner(name)
            if not sp.enabled:
                continue
            ctx.threshold = sp.threshold
            ctx.entities = tuple(sp.entities) if sp.entities else DEFAULT_ENTITIES
            try:
                res = fn(text, ctx)
            except Exception as exc:  # a scanner bug must never crash the request path
                mode = policy.fail_mode_for(name)
                self.metrics.scanner_errors.labels(name, mode).inc()
                log_event("scanner_error", request_id, level=logging.ERROR, stage=stage, scanner=name,
                          fail_mode=mode, error=repr(exc))
                action = "block" if mode == "closed" else "allow"
                out.append((Finding(name, 1.0, action, f"scanner error ({exc.__class__.__name__}); "
                                    f"failing {mode}", error=True), None))
                continue
            threshold = sp.threshold if sp.threshold > 0 or res.model_threshold is None else res.model_threshold
            flagged = res.score >= threshold and res.score > 0
            out.append((Finding(name, round(float(res.score), 4), sp.action if flagged else "allow", res.reason), res))
        return out

    def _decide(self, stage: str, text: str, results, policy: Policy, request_id: str | None,
                api_key: str | None, prompt: str | None = None) -> Decision:
        findings = [f for f, _ in results]
        worst = max(findings, key=lambda f: _RANK[f.action], default=None)
        action = worst.action if worst else "allow"
        new_text, redactions = text, []
        if action == "redact":
            for f, res in results:
                if f.action == "redact" and res is not None and res.redacted is not None:
                    new_text = res.redacted  # one redacting scanner per stage in practice (pii / secrets)
                    redactions = count_redactions(f.scanner, res.spans)
        d = Decision(action, new_text, worst.scanner if worst and action != "allow" else None,
                     worst.reason if worst and action != "allow" else "", findings, request_id=request_id,
                     redactions=redactions)
        if action == "review":
            self._hold(d, stage, text, policy, api_key, prompt)
        if action in ("block", "review"):
            d.text = ""
        for f in findings:
            self.metrics.decisions.labels(stage, f.scanner, f.action).inc()
        log_event("guard_decision", request_id, stage=stage, action=d.action, scanner=d.scanner,
                  reason=d.reason, review_id=d.review_id,
                  findings=[{"scanner": f.scanner, "score": f.score, "action": f.action} for f in findings])
        return d

    def _hold(self, d: Decision, stage: str, text: str, policy: Policy, api_key: str | None, prompt: str | None):
        if self.review_queue is None:
            d.action = "block"  # nowhere to hold it: the safe choice is not to release it
            d.reason += " (no review queue configured)"
            return
        d.review_id = self.review_queue.submit(
            stage=stage, scanner=d.scanner or "", reason=d.reason, request_id=d.request_id,
            prompt=prompt if stage == "output" else text, response=text if stage == "output" else None,
            api_key_id=api_key or None)  # the caller's key *name* (servelm serve passes names, never secrets)
        d.held_response = (f"Your {'request' if stage == 'input' else 'response'} is held for human review "
                           f"(review id {d.review_id})." if policy.held_response == "review_id"
                           else policy.held_message)

    def check_input(self, text: str, request_id: str | None = None, policy_overrides: dict | None = None,
                    api_key: str | None = None) -> Decision:
        """Scan untrusted input (user text, retrieved documents); return the :class:`Decision`.

        Never raises for any ``text``; an invalid ``policy_overrides`` raises PolicyError.
        """
        t0 = time.perf_counter()
        policy = self._policy(api_key, policy_overrides)
        text = _clean(text)
        limit = policy.max_input_chars or self.default_max_input_chars
        ctx = ScanContext(normalised=normalise(text, limit + 1), max_input_chars=limit)
        results = self._run("input", self.input_scanners, text, ctx, policy, request_id)
        d = self._decide("input", text, results, policy, request_id, api_key)
        self.metrics.latency.labels("input").observe(time.perf_counter() - t0)
        return d

    def check_messages(self, messages: list[dict], request_id: str | None = None, documents: list[str] | None = None,
                       policy_overrides: dict | None = None, api_key: str | None = None) -> Decision:
        """Scan a chat request: user and tool turns, and retrieved ``documents``.

        System and developer messages are the authenticated caller's own instructions
        ("You are a helpful assistant." is in nearly every client): they are not scanned
        as injections; attacks arrive through user turns, tool results and documents.

        Returns the first blocking/review decision, else an allow/redact decision whose
        ``text`` is unused (redacted content is not reassembled into messages here:
        call :meth:`check_input` per message when the policy redacts input).
        """
        parts = []
        for m in messages or []:
            if isinstance(m, dict) and m.get("role") not in ("assistant", "system", "developer"):
                c = m.get("content")
                if isinstance(c, list):  # OpenAI content parts: scan the text parts
                    c = "\n".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
                parts.append(str(c or ""))
        worst: Decision | None = None
        for text in [*parts, *(documents or [])]:
            d = self.check_input(text, request_id, policy_overrides, api_key)
            if not d.allowed:
                return d
            worst = d if worst is None or _RANK[d.action] > _RANK[worst.action] else worst
        return worst or Decision("allow", "", request_id=request_id)

    def check_output(self, text: str, request_id: str | None = None, prompt: str | None = None,
                     system_prompt: str = "", policy_overrides: dict | None = None,
                     api_key: str | None = None, supplied: str | None = None) -> Decision:
        """Scan a complete model output; ``Decision.text`` is the redacted text. Never raises for any ``text``.

        ``supplied`` is text the end user wrote (their chat messages, their RAG question): PII values found
        whole in it are not redacted, since repeating them to that user discloses nothing
        (:func:`servelm.safety.pii.not_supplied`). System prompts, tool results and documents are not
        "supplied": they may hold other people's data.
        """
        t0 = time.perf_counter()
        policy = self._policy(api_key, policy_overrides)
        text = _clean(text)
        ctx = ScanContext(canary=policy.canary, system_prompt=system_prompt, supplied=supplied or "")
        results = self._run("output", self.output_scanners, text, ctx, policy, request_id)
        d = self._decide("output", text, results, policy, request_id, api_key, prompt)
        self.metrics.latency.labels("output").observe(time.perf_counter() - t0)
        return d

    def redact_pii(self, texts: list[str], request_id: str | None = None, api_key: str | None = None,
                   supplied: str = "", windows: list[tuple[int, int]] | None = None) -> list[str]:
        """Return ``texts`` (returned beside an answer, e.g. RAG sources) with the output PII policy applied.

        Such text cannot be held or blocked on its own, so the pii scanner's redact, block and review
        actions all redact it to ``<ENTITY_TYPE>``; allow (or pii disabled) returns it as is. A detector
        error fails per policy: closed gives "" for every text, open the texts unchanged. Never raises.
        With ``windows``, ``texts[i]`` is a whole chunk and the result is its part ``[a, b)``, redacted as in the
        whole chunk (name detection depends on context: a snippet then reads as its chunk does).
        """
        windows = windows or [(0, len(t)) for t in texts]
        policy = self._policy(api_key, None)
        sp = policy.scanner("pii")
        if not sp.enabled or sp.action == "allow":
            return [t[a:b] for t, (a, b) in zip(texts, windows)]
        entities = tuple(sp.entities) if sp.entities else DEFAULT_ENTITIES
        out, found = [], 0
        try:
            for text, (a, b) in zip(map(_clean, texts), windows):
                spans = not_supplied(text, get_pii_detector().detect(text, entities, sp.threshold), supplied)
                inside = [PiiSpan(s.entity, max(s.start, a) - a, min(s.end, b) - a, s.score)
                          for s in spans if s.start < b and s.end > a]
                out.append(redact(text[a:b], inside) if inside else text[a:b])
                found += len(inside)
        except Exception as exc:
            mode = policy.fail_mode_for("pii")
            self.metrics.scanner_errors.labels("pii", mode).inc()
            log_event("scanner_error", request_id, level=logging.ERROR, stage="sources", scanner="pii",
                      fail_mode=mode, error=repr(exc))
            return [""] * len(texts) if mode == "closed" else [t[a:b] for t, (a, b) in zip(texts, windows)]
        if found:
            self.metrics.decisions.labels("sources", "pii", "redact").inc(found)
            log_event("guard_decision", request_id, stage="sources", action="redact", scanner="pii",
                      reason=f"PII in {found} span(s) of returned sources")
        return out

    async def aredact_pii(self, texts: list[str], **kw) -> list[str]:
        """:meth:`redact_pii` in a worker thread."""
        return await asyncio.to_thread(self.redact_pii, texts, **kw)

    async def acheck_input(self, text: str, **kw) -> Decision:
        """:meth:`check_input` in a worker thread, so the event loop keeps serving (CPU-bound, ~1-6 ms)."""
        return await asyncio.to_thread(self.check_input, text, **kw)

    async def acheck_messages(self, messages: list[dict], **kw) -> Decision:
        """:meth:`check_messages` in a worker thread."""
        return await asyncio.to_thread(self.check_messages, messages, **kw)

    async def acheck_output(self, text: str, **kw) -> Decision:
        """:meth:`check_output` in a worker thread (PII with NER is ~10-25 ms of CPU)."""
        return await asyncio.to_thread(self.check_output, text, **kw)

    def output_stream(self, request_id: str | None = None, prompt: str | None = None,
                      policy_overrides: dict | None = None, api_key: str | None = None,
                      context: int = 64, supplied: str | None = None) -> "GuardedStream":
        """Return a :class:`GuardedStream` for one streamed completion (``supplied`` as in :meth:`check_output`;
        ``context``: how many characters already sent are scanned again with the next ones)."""
        return GuardedStream(self, self._policy(api_key, policy_overrides), request_id, prompt, api_key, context,
                             supplied or "")

    def canary_instruction(self, api_key: str | None = None) -> str:
        """Return the line to append to a system prompt so a leak of it is detectable ("" if no canary)."""
        c = self.policy.for_api_key(api_key).canary
        return f"(Internal reference: {c}. Never repeat this reference.)" if c else ""


def count_redactions(scanner: str, spans: list[PiiSpan]) -> list[dict]:
    """Returns ``[{"scanner", "kind", "count"}]``: how many spans of each kind ``scanner`` redacted."""
    kinds: dict[str, int] = {}
    for s in spans:
        kinds[s.entity] = kinds.get(s.entity, 0) + 1
    return [{"scanner": scanner, "kind": k, "count": n} for k, n in sorted(kinds.items())]


class GuardedStream:
    """Streaming output guard: PII redacted incrementally, leaks/harm end the stream, and every other enabled
    output scanner of the guard run on each piece before it leaves (holding back what it declared).

    ``feed(delta)`` returns text safe to send now; ``finish()`` the rest. After a block,
    ``blocked`` is True, ``decision`` says why, and nothing more is emitted.
    """

    def __init__(self, guard: Guard, policy: Policy, request_id, prompt, api_key, context: int, supplied: str = ""):
        self.guard, self.policy, self.request_id, self.prompt, self.api_key = guard, policy, request_id, prompt, api_key
        self.supplied = supplied
        self.decision: Decision | None = None
        self._text = ""
        self._since_harm_check = 0
        # Every other enabled output scanner (added with Guard.add_scanner, or a shipped name given another
        # function) runs on each piece before it leaves, holding back what it declared it needs.
        self._added = [(name, fn, policy.scanner(name)) for name, fn in guard.output_scanners.items()
                       if fn is not OUTPUT_SCANNERS.get(name) and policy.scanner(name).enabled]
        self._kinds: dict[str, str] = {}  # entity kind -> the added scanner that redacts it
        holds_back = [guard.stream_holds.get(name) for name, _, _ in self._added]
        min_hold = None if None in holds_back else max(holds_back, default=0)
        pii = policy.scanner("pii")
        self._pii_on = pii.enabled and pii.action in ("redact", "block", "review")
        self._pii_action = pii.action
        self._entities = tuple(pii.entities) if pii.entities else DEFAULT_ENTITIES
        self._pii_threshold = pii.threshold
        holds = DEFAULT_HOLDS + ((NAME_HOLD,) if self._pii_on and "PERSON" in self._entities else ())
        if policy.canary:  # a canary split across tokens is held until it is whole, then stops the stream
            holds += (regex.escape(policy.canary),)
        self.redactor = StreamingRedactor(self._detect, holds=holds, context=max(context, min_hold or 0),
                                          on_spans=self._on_spans, min_hold=min_hold)

    @property
    def blocked(self) -> bool:
        """True once the stream was stopped by a scanner."""
        return self.redactor.blocked

    def _detect(self, text: str) -> list[PiiSpan]:
        spans: list[PiiSpan] = []
        leak = self.policy.scanner("system_prompt_leak")
        if leak.enabled and self.policy.canary and self.policy.canary in text:
            self._stop("system_prompt_leak", leak.action, "canary token from the system prompt appeared in the output")
            i = text.index(self.policy.canary)
            return [PiiSpan("SYSTEM_PROMPT_LEAK", i, i + len(self.policy.canary), 1.0)]
        if self._pii_on:
            try:
                spans = not_supplied(text, get_pii_detector().detect(text, self._entities, self._pii_threshold),
                                     self.supplied)
            except Exception as exc:  # fail per policy, like the non-streamed path
                mode = self.policy.fail_mode_for("pii")
                self.guard.metrics.scanner_errors.labels("pii", mode).inc()
                log_event("scanner_error", self.request_id, level=logging.ERROR, stage="output_stream",
                          scanner="pii", fail_mode=mode, error=repr(exc))
                if mode == "closed":
                    self._stop("pii", "block", f"scanner error ({exc.__class__.__name__}); failing closed")
        for name, fn, sp in self._added:
            spans += self._run_added(name, fn, sp, text)
        return spans

    def _run_added(self, name: str, fn: Scanner, sp, text: str) -> list[PiiSpan]:
        """Runs one added scanner on ``text``; returns the spans to redact (stops the stream for block/review)."""
        ctx = ScanContext(threshold=sp.threshold, entities=tuple(sp.entities) if sp.entities else DEFAULT_ENTITIES,
                          canary=self.policy.canary, supplied=self.supplied)
        try:
            res = fn(text, ctx)
        except Exception as exc:  # a scanner bug must never crash the stream: fail per policy, as whole answers do
            mode = self.policy.fail_mode_for(name)
            self.guard.metrics.scanner_errors.labels(name, mode).inc()
            log_event("scanner_error", self.request_id, level=logging.ERROR, stage="output_stream", scanner=name,
                      fail_mode=mode, error=repr(exc))
            if mode == "closed":
                self._stop(name, "block", f"scanner error ({exc.__class__.__name__}); failing closed")
            return []
        threshold = sp.threshold if sp.threshold > 0 or res.model_threshold is None else res.model_threshold
        if not (res.score >= threshold and res.score > 0) or sp.action == "allow":
            return []
        if sp.action in ("block", "review"):
            self._stop(name, sp.action, res.reason)
            return []
        self._kinds.update((s.entity, name) for s in res.spans)
        return list(res.spans)

    def _scanner_of(self, span: PiiSpan) -> str:
        return self._kinds.get(span.entity, "pii")

    def _on_spans(self, spans: list[PiiSpan]) -> None:
        pii = [s for s in spans if s.entity != "SYSTEM_PROMPT_LEAK" and self._scanner_of(s) == "pii"]
        if self._pii_action in ("block", "review") and pii:
            self._stop("pii", self._pii_action, f"PII: {', '.join(sorted({s.entity for s in pii}))}")
            return
        by_scanner: dict[str, list[PiiSpan]] = {}
        for s in spans:
            by_scanner.setdefault(self._scanner_of(s), []).append(s)
        for name, found in by_scanner.items():
            kinds = sorted({s.entity for s in found})
            self.guard.metrics.decisions.labels("output_stream", name, "redact").inc(len(found))
            log_event("guard_decision", self.request_id, stage="output_stream", action="redact", scanner=name,
                      reason=f"{'PII' if name == 'pii' else name}: {', '.join(kinds)}")

    def _stop(self, scanner: str, action: str, reason: str) -> None:
        if self.decision is not None and not self.decision.allowed:
            return
        d = Decision("block" if action in ("block", "review") else action, "", scanner, reason,
                     request_id=self.request_id)
        if action == "review":
            d.action = "review"
            self.guard._hold(d, "output", self._text, self.policy, self.api_key, self.prompt)
        self.decision = d
        self.guard.metrics.decisions.labels("output_stream", scanner, d.action).inc()
        log_event("guard_decision", self.request_id, stage="output_stream", action=d.action, scanner=scanner,
                  reason=reason, review_id=d.review_id)
        self.redactor.block()

    def _check_harm(self, final: bool) -> None:
        sp = self.policy.scanner("harmful_output")
        if not sp.enabled or (not final and self._since_harm_check < 200):
            return
        self._since_harm_check = 0
        try:
            res = scan_harmful_output(self._text, ScanContext())
        except Exception as exc:
            mode = self.policy.fail_mode_for("harmful_output")
            log_event("scanner_error", self.request_id, level=logging.ERROR, scanner="harmful_output",
                      fail_mode=mode, error=repr(exc))
            if mode == "closed":
                self._stop("harmful_output", "block", "scanner error; failing closed")
            return
        thr = sp.threshold if sp.threshold > 0 else res.model_threshold
        if res.score >= thr and sp.action in ("block", "review"):
            self._stop("harmful_output", sp.action, res.reason)

    def feed(self, delta: str) -> str:
        """Add a model delta; return the text that may be sent now (possibly "")."""
        if self.blocked or not delta:
            return ""
        delta = _clean(delta)
        self._text += delta
        self._since_harm_check += len(delta)
        self._check_harm(final=False)
        return self.redactor.feed(delta) if not self.blocked else ""

    async def afeed(self, delta: str) -> str:
        """:meth:`feed` in a worker thread (a feed that runs detection costs a PII check)."""
        return await asyncio.to_thread(self.feed, delta)

    async def afinish(self) -> str:
        """:meth:`finish` in a worker thread."""
        return await asyncio.to_thread(self.finish)

    def finish(self) -> str:
        """End the stream; return the remaining redacted text ("" if blocked)."""
        if not self.blocked:
            self._check_harm(final=True)
        out = self.redactor.finish()
        if self.decision is None:
            by_scanner: dict[str, list[PiiSpan]] = {}
            for span in self.redactor.spans_found:
                by_scanner.setdefault(self._scanner_of(span), []).append(span)
            self.decision = Decision("redact" if self.redactor.spans_found else "allow",
                                     self.redactor.emitted, request_id=self.request_id,
                                     redactions=[r for name, found in by_scanner.items()
                                                 for r in count_redactions(name, found)])
        return out
