"""Verification: which proposed tokens to keep, so that the output is exactly the target model's.

Each speculating sequence brings ``k`` proposals ``d_0 .. d_{k-1}`` and the target's logits at ``k + 1``
positions (after its last token and after each proposal). Greedy: ``d_j`` is kept while it is the
argmax at row ``j``; the first argmax that differs (or the argmax after the last proposal) is emitted
too, so every step emits at least one token and the output equals plain greedy decoding. Sampled
(Leviathan et al. 2023, Chen et al. 2023): the proposal distribution of a proposer that returns tokens
without probabilities (n-gram lookup) is a point mass ``q = δ(d_j)``, so ``d_j`` is kept with probability
``min(1, p(d_j) / q(d_j)) = p(d_j)``; on rejection the token is drawn from ``max(p - q, 0)`` normalised,
i.e. ``p`` without ``d_j``; after ``k`` acceptances a bonus token is drawn from the last row. Each
emitted token is then distributed exactly as the target's ``p`` (after temperature, top-k, top-p, min-p).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from servelm.engine.sampling import Sampler, token_logprobs
from servelm.engine.sequence import Sequence


@dataclass(slots=True)
class VerifiedSample:
    """Per sequence: the tokens to append in order (accepted proposals, then one target token) and
    their logprob entries (None where not requested), and how many proposals were verified."""

    token_ids: list[list[int]]
    logprobs: list[list]
    num_proposed: list[int]


@torch.inference_mode()
def verify(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]) -> VerifiedSample:
    """Accept or reject the proposals ``seq.spec_token_ids`` of each of ``seqs``, whose rows in ``logits``
    follow each other: ``1 + len(seq.spec_token_ids)`` rows per sequence (1 for one that did not speculate).

    The sequences' sampling must not depend on their output so far (``LLMEngine._speculable``): every row
    of a sequence is processed with the same penalties-free state."""
    counts = [1 + len(s.spec_token_ids) for s in seqs]
    row_seqs = [s for s, c in zip(seqs, counts) for _ in range(c)]
    processed = sampler._process(logits, row_seqs)
    # a plain draw (argmax when greedy) at every row: the bonus token, the greedy choice, or the token of a
    # sequence without proposals (drawn exactly as without speculation)
    chosen = sampler._choose(processed, row_seqs).tolist()
    logprobs_all = (torch.log_softmax(processed, dim=-1) if any(s.params.logprobs is not None for s in seqs)
                    else None)
    # the target distribution of every row of the sampled speculating sequences, in one pass, on the host
    # (the accept/reject walk below is sequential per sequence)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    sampled = [i for i, (s, c) in enumerate(zip(seqs, counts)) if c > 1 and not s.params.greedy]
    probs, at = None, {}
    if sampled:
        rows = [r for i in sampled for r in range(starts[i], starts[i + 1])]
        probs = sampler.probs(processed[torch.tensor(rows, device=processed.device)],
                              [row_seqs[r] for r in rows]).cpu()
        off = 0
        for i in sampled:
            at[i] = off
            off += counts[i]
    out_ids, out_lps = [], []
    row = 0
    for i, (seq, c) in enumerate(zip(seqs, counts)):
        drafts = seq.spec_token_ids
        if c == 1:
            toks = [chosen[row]]
        elif seq.params.greedy:
            toks = []
            for j, d in enumerate(drafts):
                toks.append(chosen[row + j])
                if chosen[row + j] != d:
                    break
            else:
                toks.append(chosen[row + c - 1])
        else:
            toks = _rejection_sample(probs[at[i]:at[i] + c], seq, drafts, chosen[row + c - 1])
        k = seq.params.logprobs
        out_lps.append([token_logprobs(logprobs_all[row + j], t, k) if k is not None else None
                        for j, t in enumerate(toks)])
        out_ids.append(toks)
        row += c
    return VerifiedSample(out_ids, out_lps, [c - 1 for c in counts])


def _rejection_sample(probs: torch.Tensor, seq: Sequence, drafts: list[int], bonus: int) -> list[int]:
    """The accepted proposals plus one token: a residual draw at the first rejection, else ``bonus``
    (``probs``: the target distribution at the ``len(drafts) + 1`` rows)."""
    gen = seq.generator  # a seeded request draws every random number from its own stream
    p_draft = probs[torch.arange(len(drafts)), torch.tensor(drafts)].tolist()
    uniform = torch.rand(len(drafts), generator=gen).tolist()
    toks = []
    for j, d in enumerate(drafts):
        if uniform[j] < p_draft[j]:
            toks.append(d)
            continue
        residual = probs[j].clone()
        residual[d] = 0.0  # max(p - δ(d), 0); p(d) < 1 here, so some mass is left
        toks.append(int(torch.multinomial(residual, 1, generator=gen)))
        return toks
    toks.append(bonus)
    return toks
