"""Batched sampling with per-request parameters, in one pass over the batch's logits.

Order: penalties → structured-output masks → (raw logprobs) → greedy argmax, or temperature → top-k → top-p →
min-p → draw. Draws use the exponential race (``argmax(p / Exp(1))``), which lets a
seeded request draw its noise from its own generator while the rest share one call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from servelm.engine.sequence import Sequence
from servelm.engine.structured_output import apply_grammar_masks


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    # Per row: (chosen logprob, [(token id, logprob), ...] top-k) or None when not requested.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = sorted(eos_token_ids)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        logits = logits.float()
        self._apply_penalties(logits, seqs)
        self._suppress_early_eos(logits, seqs)
        if any(s.grammar is not None for s in seqs):
            apply_grammar_masks(logits, seqs)
        params = [s.params for s in seqs]
        want_lp = [p.logprobs is not None for p in params]
        logprobs_all = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

        greedy = torch.tensor([p.greedy for p in params])
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            rows = (~greedy).nonzero().flatten()
            tokens[rows] = self._draw(logits[rows], [seqs[i] for i in rows.tolist()])
        token_list = tokens.tolist()

        lps: list = [None] * len(seqs)
        if logprobs_all is not None:
            for i, p in enumerate(params):
                if p.logprobs is None:
                    continue
                row = logprobs_all[i]
                top = []
                if p.logprobs > 0:
                    vals, ids = row.topk(p.logprobs)
                    top = list(zip(ids.tolist(), vals.tolist()))
                lps[i] = (float(row[token_list[i]]), top)
        return SampleResult(token_list, lps)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, s in enumerate(seqs):
            p = s.params
            if p.repetition_penalty != 1.0:
                # As in transformers/vLLM: prompt and output tokens, divide positive logits, multiply negative.
                ids = torch.tensor(sorted(set(s.token_ids)), dtype=torch.long, device=logits.device)
                vals = logits[i, ids]
                logits[i, ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and s.num_output_tokens:
                # OpenAI semantics: output tokens only.
                out = torch.tensor(s.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.zeros(logits.shape[-1], device=logits.device).index_add_(
                    0, out, torch.ones(len(out), device=logits.device))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    def _suppress_early_eos(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for i, s in enumerate(seqs):
            # a grammar decides where EOS may come: masking it out where the grammar needs it would leave no token
            if s.num_output_tokens < s.params.min_tokens and s.grammar is None:
                ids = list(self.eos_token_ids) + list(s.params.stop_token_ids)
                logits[i, ids] = float("-inf")

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        logits = logits / temps[:, None]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        min_p = [s.params.min_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if any(m > 0 for m in min_p):
            mp = torch.tensor(min_p, device=probs.device)[:, None]
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i] = torch.empty(probs.shape[-1]).exponential_(generator=s.generator).to(probs.device)
        return (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.tensor([min(kk, vocab) if kk > 0 else vocab for kk in top_k], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    remove = ranks >= k[:, None]
    p = torch.tensor(top_p, device=logits.device)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    cum = probs.cumsum(dim=-1)
    remove |= (cum - probs) >= p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
