"""Structured outputs: sampling constrained to a JSON schema, a regex, a list of choices or an EBNF grammar.

xgrammar (as in vLLM v1) compiles a :class:`StructuredOutputParams` against the tokenizer's vocabulary
into a grammar that knows, at every position, which tokens may come next. Each constrained sequence
owns a ``GrammarMatcher`` (``Sequence.grammar``; ``n`` completions get one each): before sampling its
next-token bitmask sets the forbidden logits of that row to -inf, after sampling it accepts the token.
The model's EOS is allowed only where the grammar is complete, so a finished grammar ends the sequence
with finish_reason "stop". Preemption-by-recompute keeps a sequence's tokens, so its matcher stays valid;
a matcher is plain per-sequence state and goes when its sequence does (finished or aborted).

xgrammar is imported only when the first constrained request arrives (the import takes seconds).
"""
from __future__ import annotations

import json
import re
import threading

import torch

from servelm.engine.sampling_params import InvalidRequestError, StructuredOutputParams
from servelm.engine.sequence import Sequence
from servelm.engine.tokenizer import Tokenizer

# xgrammar's errors read "[20:54:08] /project/cpp/regex_converter.cc:83: <message>": keep the message
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class GrammarCompiler:
    """Compiles structured-output specs for one tokenizer; thread-safe (the async engine compiles off the
    step thread, the engine's ``add_request`` then finds the grammar in xgrammar's compile cache)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        """``vocab_size`` is the model's (the logits' width), which may exceed the tokenizer's."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler = None
        self._lock = threading.Lock()

    def _xgr_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr  # noqa: PLC0415 (optional until the first constrained request)

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer.hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=sorted(self.tokenizer.eos_token_ids))
                # xgrammar caches compiled grammars by their spec: each distinct spec compiles once.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                                     cache_limit_bytes=256 << 20)
            return self._compiler

    def compile(self, spec: StructuredOutputParams):
        """Returns the ``xgrammar.CompiledGrammar`` of ``spec``.

        Raises :class:`InvalidRequestError` naming ``structured_output.<kind>`` for a spec xgrammar
        refuses (a bad JSON schema, regex or grammar).
        """
        spec.validate()
        compiler = self._xgr_compiler()
        kind = spec.kind
        try:
            if kind == "json":
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                # compact JSON: free whitespace lets a small model loop on newlines until max_tokens
                return compiler.compile_json_schema(schema, any_whitespace=False)
            if kind == "json_object":  # OpenAI's JSON mode: some JSON object
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(spec.regex)
            if kind == "choice":  # EBNF string literals take JSON's escapes
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar reports bad specs as RuntimeError
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
            msg = _CPP_PREFIX.sub("", str(e).strip())
            raise InvalidRequestError(f"structured_output.{kind}: invalid {what}: {msg}",
                                      f"structured_output.{kind}") from None

    def matcher(self, compiled):
        """Returns a fresh ``xgrammar.GrammarMatcher`` (one per sequence)."""
        import xgrammar as xgr  # noqa: PLC0415

        return xgr.GrammarMatcher(compiled)


def apply_grammar_masks(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Sets to -inf, in place, the logits each constrained row's grammar forbids next (rows without a
    grammar are untouched). One bitmask for the batch, one copy to the logits' device."""
    import xgrammar as xgr  # noqa: PLC0415 (only reached when some sequence has a grammar)

    rows = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.grammar.is_terminated()]
    if not rows:
        return
    bitmask = xgr.allocate_token_bitmask(len(seqs), logits.shape[-1])
    for i in rows:
        seqs[i].grammar.fill_next_token_bitmask(bitmask, i)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)


def accept_token(seq: Sequence, token_id: int) -> bool:
    """Advances ``seq``'s grammar by its sampled token; returns True when the sequence must end: the grammar
    accepted its stop token (EOS, allowed only where the output is complete), or refused the token."""
    m = seq.grammar
    return not m.accept_token(token_id) or m.is_terminated()
