"""Batched sampling with per-request parameters, in one pass over the batch's logits.

Order: logit bias → allowed tokens and bad words → logits processors → penalties → structured-output masks → (raw logprobs) →
greedy argmax, or temperature → top-k → top-p → min-p → draw. Draws use the exponential race
(``argmax(p / Exp(1))``), which lets a seeded request draw its noise from its own generator while the rest
share one call.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from servelm.engine.sampling_params import logits_processor_arity
from servelm.engine.sequence import Sequence
from servelm.engine.structured_output import apply_grammar_masks


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    # Per row: (chosen logprob, [(token id, logprob), ...] top-k, chosen's rank) or None when not requested.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = sorted(eos_token_ids)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        logits = self._process(logits, seqs)
        token_list = self._choose(logits, seqs).tolist()  # the step's one host synchronisation
        params = [s.params for s in seqs]
        lps: list = [None] * len(seqs)
        if any(p.logprobs is not None for p in params):
            logprobs_all = torch.log_softmax(logits, dim=-1)
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    lps[i] = token_logprobs(logprobs_all[i], token_list[i], p.logprobs)
        return SampleResult(token_list, lps)

    @torch.inference_mode()
    def sample_on_device(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The chosen token ids (``[rows]`` int64, on the logits' device), without waiting for the device.

        For async scheduling: the rows must need no host state that this step changes (no penalties,
        grammar, logprobs or seeded generator; see ``LLMEngine._overlappable``).
        """
        return self._choose(self._process(logits, seqs), seqs)

    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Float32 logits after penalties, early-EOS suppression and structured-output masks."""
        logits = logits.float().contiguous()  # the penalties index it flat
        self._apply_logit_bias(logits, seqs)
        self._apply_token_bans(logits, seqs)
        self._apply_logits_processors(logits, seqs)
        self._apply_penalties(logits, seqs)
        self._suppress_early_eos(logits, seqs)
        if any(s.grammar is not None for s in seqs):
            apply_grammar_masks(logits, seqs)
        return logits

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Greedy rows take the argmax, the others a draw; no host synchronisation on CUDA."""
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not sampled:
            return _argmax(logits)
        if len(sampled) == len(seqs):
            return self._draw(logits, seqs)
        rows = host_to_device(sampled, torch.int64, logits.device)
        drawn = self._draw(logits.index_select(0, rows), [seqs[i] for i in sampled])
        return _argmax(logits).index_copy(0, rows, drawn)

    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        if rows:  # one scatter for the batch, copied through pinned memory (no host sync on CUDA)
            ids = [[i, t] for i in rows for t in seqs[i].params.logit_bias]
            at = host_to_device(ids, torch.int64, logits.device)
            vals = host_to_device([v for i in rows for v in seqs[i].params.logit_bias.values()], torch.float32,
                                  logits.device)
            logits.index_put_((at[:, 0], at[:, 1]), vals, accumulate=True)

    def _apply_token_bans(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """``allowed_token_ids`` (every other token gets -inf) and ``bad_words``, as vLLM applies them: a word's
        last token is banned when the output so far ends with the word's other tokens (a one-token word is always
        banned)."""
        vocab = logits.shape[-1]
        banned = []
        for i, s in enumerate(seqs):
            p = s.params
            if p.allowed_token_ids is not None:
                mask = torch.ones(vocab, dtype=torch.bool, device=logits.device)
                mask[host_to_device([t for t in p.allowed_token_ids if t < vocab], torch.int64, logits.device)] = False
                logits[i].masked_fill_(mask, float("-inf"))
            for word in p.bad_words_token_ids or ():
                prefix = word[:-1]
                if not prefix or s.output_token_ids[len(s.output_token_ids) - len(prefix):] == prefix:
                    banned.append([i, word[-1]])
        if banned:
            at = host_to_device(banned, torch.int64, logits.device)
            logits.index_put_((at[:, 0], at[:, 1]), host_to_device([float("-inf")] * len(banned), torch.float32,
                                                                   logits.device))

    @staticmethod
    def _apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Each row through its request's ``logits_processors`` (vLLM's per-request callables), in order."""
        for i, s in enumerate(seqs):
            for fn in s.params.logits_processors or ():
                out_ids = s.output_token_ids
                if logits_processor_arity(fn) == 3:
                    logits[i] = fn(s.token_ids[:s.num_prompt_tokens], out_ids, logits[i])
                else:
                    logits[i] = fn(out_ids, logits[i])

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Repetition penalty (prompt and output tokens; divides positive logits, multiplies negative ones, as
        transformers and vLLM do), then OpenAI's presence and frequency penalties (output tokens only).

        Each is one gather/scatter over the (row, token) pairs that occur, counted on the host, so the cost
        follows the tokens, not rows x vocabulary."""
        vocab, flat = logits.shape[-1], logits.view(-1)
        ids, pen = [], []
        for i, s in enumerate(seqs):
            if s.params.repetition_penalty != 1.0:
                seen = set(s.token_ids)
                ids += [i * vocab + t for t in seen]
                pen += [s.params.repetition_penalty] * len(seen)
        if ids:
            at = host_to_device(ids, torch.int64, logits.device)
            p = host_to_device(pen, torch.float32, logits.device)
            vals = flat[at]
            flat[at] = torch.where(vals > 0, vals / p, vals * p)
        ids, sub = [], []
        for i, s in enumerate(seqs):
            f, pr = s.params.frequency_penalty, s.params.presence_penalty
            if (f or pr) and s.num_output_tokens:
                for t, n in Counter(s.output_token_ids).items():
                    ids.append(i * vocab + t)
                    sub.append((f, n, pr))
        if ids:
            at = host_to_device(ids, torch.int64, logits.device)
            f, n, pr = host_to_device(sub, torch.float32, logits.device).unbind(1)
            flat[at] -= f * n + pr

    def _suppress_early_eos(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        # a grammar decides where EOS may come: masking it out where the grammar needs it would leave no token
        ids = [[i, t] for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens and s.grammar is None
               for t in (*self.eos_token_ids, *s.params.stop_token_ids)]
        if ids:
            at = host_to_device(ids, torch.int64, logits.device)
            logits.index_put_((at[:, 0], at[:, 1]), host_to_device([float("-inf")] * len(ids), torch.float32,
                                                                   logits.device))

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        probs = self.probs(logits, seqs)
        dev = logits.device
        noise = torch.empty_like(probs).exponential_()
        for i, s in enumerate(seqs):
            if s.generator is not None:  # its own stream: the draw does not depend on batch mates
                noise[i] = torch.empty(probs.shape[-1]).exponential_(generator=s.generator).to(dev)
        return (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)

    @staticmethod
    def probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The distribution each row draws from: softmax after temperature, top-k, top-p and min-p
        (speculative decoding's rejection sampling accepts against exactly this)."""
        dev = logits.device
        temps = host_to_device([s.params.temperature for s in seqs], torch.float32, dev)
        logits = logits / temps[:, None]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        min_p = [s.params.min_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if any(m > 0 for m in min_p):
            mp = host_to_device(min_p, torch.float32, dev)[:, None]
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs


def token_logprobs(row: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]], int]:
    """(``token``'s logprob, the top ``k`` (token, logprob) pairs, ``token``'s rank) of one row of logprobs."""
    top = []
    if k > 0:
        vals, ids = row.topk(k)
        top = list(zip(ids.tolist(), vals.tolist()))
    chosen = row[token]
    return float(chosen), top, int((row > chosen).sum()) + 1


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of ``values`` on ``device``; on CUDA copied from pinned memory without a sync
    (``torch.tensor(..., device=...)`` would wait for the queued steps to finish, defeating async scheduling)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax; on CUDA in two passes (``torch.argmax`` runs a whole vocabulary row in one block).

    Both passes keep the first of equal maxima, so the result is ``logits.argmax(-1)``'s."""
    rows, vocab = logits.shape
    chunks = 256
    while vocab % chunks:
        chunks //= 2
    if logits.device.type != "cuda" or chunks < 16:
        return logits.argmax(dim=-1)
    vals, idx = logits.view(rows, chunks, vocab // chunks).max(dim=-1)
    best = vals.argmax(dim=-1, keepdim=True)
    return (best * (vocab // chunks) + idx.gather(1, best))[:, 0]


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = host_to_device([min(kk, vocab) if kk > 0 else vocab for kk in top_k], torch.int64, logits.device)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    remove = ranks >= k[:, None]
    p = host_to_device(top_p, torch.float32, logits.device)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    cum = probs.cumsum(dim=-1)
    remove |= (cum - probs) >= p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
