"""After each step: append sampled tokens, detokenize, apply stop rules, and build outputs."""
from __future__ import annotations

import time

from servelm.engine.detokenizer import detokenize_new_text, find_stop_string, stop_string_holdback
from servelm.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, TokenLogprobs
from servelm.engine.sequence import Sequence
from servelm.engine.structured_output import accept_token
from servelm.engine.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tok = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def append_token(self, seq: Sequence, token_id: int, lp) -> None:
        """Add one sampled token to ``seq`` and decide whether it is finished."""
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        seq.token_ids.append(token_id)
        p = seq.params
        if lp is not None:
            chosen, top, rank = lp
            seq.cumulative_logprob += chosen
            seq.logprobs.append(TokenLogprobs(
                self._logprob(token_id, chosen, rank), [self._logprob(t, v, r + 1) for r, (t, v) in enumerate(top)]))
        if seq.grammar is not None and accept_token(seq, token_id):
            # the grammar is complete (it accepted EOS) or refused the token (masking rules that out)
            seq.finish_reason = "stop"
            return
        if not p.ignore_eos and token_id in self.eos_token_ids:
            seq.finish_reason = "stop"
            return
        if token_id in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token_id
            return
        new_text = detokenize_new_text(self.tok, seq) if p.detokenize else ""
        if new_text:
            seq.output_text += new_text
            if p.stop and seq.num_output_tokens >= p.min_tokens:
                hit = find_stop_string(seq.output_text, len(new_text), p.stop)
                if hit is not None:
                    pos, s = hit
                    seq.output_text = seq.output_text[:pos + (len(s) if p.include_stop_str_in_output else 0)]
                    seq.finish_reason, seq.stop_reason = "stop", s
                    return
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def append_prompt_logprobs(self, seq: Sequence,
                               entries: list[tuple[int, float, list[tuple[int, float]], int]]) -> None:
        """Record the logprobs of the next prompt tokens of ``seq``: (token, logprob, top alternatives, rank) each."""
        for tok, lp, top, rank in entries:
            seq.prompt_logprobs.append(TokenLogprobs(
                self._logprob(tok, lp, rank), [self._logprob(t, v, r + 1) for r, (t, v) in enumerate(top)]))

    def _logprob(self, token_id: int, logprob: float, rank: int | None = None) -> Logprob:
        return Logprob(token_id, logprob, self.tok.decode([token_id], skip_special_tokens=False), rank,
                       self.tok.token_bytes(token_id))

    def make_output(self, request_id: str, prompt: str | None, prompt_ids: list[int], seqs: list[Sequence],
                    arrival_time: float, finished: bool) -> RequestOutput:
        """Snapshot of a request: cumulative text plus the delta since the last snapshot."""
        outs = []
        for s in seqs:
            text = s.output_text
            visible = len(text)
            if s.finish_reason is None and s.params.stop:
                visible -= stop_string_holdback(text, s.params.stop)
            delta = text[s.emitted_text_len:visible] if visible > s.emitted_text_len else ""
            s.emitted_text_len = max(s.emitted_text_len, visible)
            out_ids = s.output_token_ids
            delta_ids = out_ids[s.emitted_token_count:]
            delta_lps = s.logprobs[s.emitted_token_count:] if s.logprobs is not None else None
            s.emitted_token_count = len(out_ids)
            outs.append(CompletionOutput(
                index=s.index, text=text[:visible], token_ids=list(out_ids), delta_text=delta,
                delta_token_ids=delta_ids, finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=s.logprobs, delta_logprobs=delta_lps,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None))
        first = seqs[0]
        metrics = RequestMetrics(
            arrival_time=arrival_time, first_scheduled_time=first.first_scheduled_time,
            first_token_time=min((s.first_token_time for s in seqs if s.first_token_time), default=None),
            last_token_time=max((s.last_token_time for s in seqs if s.last_token_time), default=None),
            finished_time=time.monotonic() if finished else None,
            num_cached_prompt_tokens=first.num_cached_prompt_tokens)
        return RequestOutput(request_id, prompt, prompt_ids, outs, finished, metrics,
                             num_cached_tokens=first.num_cached_prompt_tokens,
                             prompt_logprobs=first.prompt_logprobs)
