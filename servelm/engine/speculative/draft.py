"""The draft-model proposer: a small model of the target's vocabulary guesses ``k`` tokens greedily.

The draft runs through its own :class:`~servelm.engine.runner.ModelRunner` on its own paged KV cache
(the same block size as the target's, its own pool), so a target sequence's draft K/V stay in place
from one step to the next: each step computes only the tokens the target appended since (the accepted
proposals and the target's own token), then ``k - 1`` single-token steps, batched over the sequences.

The draft proposes its argmax, a deterministic function of the tokens so far, so verification treats
every proposal as a point mass (``verify.py``) and the output is exactly the target's, sampled or not.
"""
from __future__ import annotations

import time

import torch

from servelm.engine.kv_cache import KVCacheManager
from servelm.engine.models.loader import LoadedModel
from servelm.engine.runner import ModelRunner
from servelm.engine.sampling_params import SamplingParams
from servelm.engine.sequence import Sequence
from servelm.engine.speculative.config import SpeculativeConfig
from servelm.engine.speculative.proposer import Proposer


def check_draft_vocabulary(draft: LoadedModel, target_vocab_size: int, name: str) -> None:
    """Raises ValueError when the draft's vocabulary is not the target's (its proposals would be other tokens)."""
    if draft.config.vocab_size != target_vocab_size:
        raise ValueError(f"speculative_config model {name!r} has a vocabulary of {draft.config.vocab_size} tokens "
                         f"and the target model {target_vocab_size}: a draft model must share the target's "
                         "tokenizer (choose a smaller model of the same family)")


class DraftModelProposer(Proposer):
    """Proposes up to ``num_speculative_tokens`` tokens per sequence by greedy decoding with ``draft``."""

    def __init__(self, config: SpeculativeConfig, draft: LoadedModel, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, attention_backend: str = "auto"):
        self.k = config.num_speculative_tokens
        self.model = draft.model
        self.max_len = draft.config.max_position_embeddings
        self.runner = ModelRunner(draft.model, num_blocks, block_size, device, dtype, None, attention_backend)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.states: dict[int, list] = {}  # target seq_id -> [target, its draft sequence, synced length]

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in seqs]
        todo: list[tuple[int, Sequence, int]] = []  # (index in seqs, draft sequence, proposals wanted)
        first: list[tuple[Sequence, int]] = []
        for i, (seq, lim) in enumerate(zip(seqs, limits)):
            lim = min(self.k, lim, self.max_len - seq.num_tokens)
            if lim < 1:
                continue
            d = self._sync(seq)
            new = d.num_tokens - d.num_computed_tokens
            if not self.kv.allocate(d, new + lim - 1):  # the draft pool is full: this one goes without
                self._drop(seq.seq_id)
                continue
            todo.append((i, d, lim))
            first.append((d, new))
        items = first
        while todo:
            for d, tok in zip((d for _, d, _ in todo), self._argmax(items)):
                d.num_computed_tokens = d.num_tokens
                d.token_ids.append(tok)
            for i, d, _ in todo:
                out[i].append(d.token_ids[-1])
            todo = [t for t in todo if len(out[t[0]]) < t[2]]
            items = [(d, 1) for _, d, _ in todo]
        return out

    def _sync(self, seq: Sequence) -> Sequence:
        """The draft sequence of ``seq`` with its tokens, its K/V kept only where they are of those tokens."""
        state = self.states.get(seq.seq_id)
        if state is None:
            d = Sequence(seq.request_id, seq.index, [], SamplingParams(max_tokens=1), time.monotonic(), 1)
            state = self.states[seq.seq_id] = [seq, d, 0]
        _, d, synced = state  # synced: the target's length at the last sync (the draft's tokens agree up to it)
        tokens = seq.token_ids
        valid = min(d.num_computed_tokens, len(tokens) - 1)  # the last token's logits are the first proposal's
        for p in range(synced, valid):  # the first proposal the target did not take
            if d.token_ids[p] != tokens[p]:
                valid = p
                break
        d.num_computed_tokens = valid
        self.kv.trim(d, valid)
        d.token_ids = list(tokens)
        state[2] = len(tokens)
        return d

    def _argmax(self, items: list[tuple[Sequence, int]]) -> list[int]:
        """The draft's greedy next token of each item's sequence after computing its ``n`` new tokens."""
        hidden, rows, samplers, _ = self.runner._forward(items)
        toks = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)]).argmax(dim=-1).tolist()
        by_seq = {s.seq_id: t for s, t in zip(samplers, toks)}  # the runner packs multi-token rows first
        return [by_seq[d.seq_id] for d, _ in items]

    def release_finished(self) -> None:
        for sid in [sid for sid, (seq, _, _) in self.states.items() if seq.finished]:
            self._drop(sid)

    def _drop(self, seq_id: int) -> None:
        state = self.states.pop(seq_id, None)
        if state is not None:
            self.kv.free(state[1])
