"""Turns a scheduled batch into tensors, runs the model, and samples.

It owns the model, the KV cache tensors and the attention backend. Sequences that
compute several tokens (prefills) are packed first, single-token decodes after them;
logits are computed only for the last token of sequences that finish their known
tokens this step (a chunk in the middle of a prompt samples nothing), and for every proposed
token of a sequence verifying speculative proposals (``speculative/verify.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from servelm.engine.attention import BatchLayout, get_backend
from servelm.engine.attention.base import as_decode_rows
from servelm.engine.models.llama import LlamaForCausalLM
from servelm.engine.parallel import pack_items
from servelm.engine.sampling import Sampler, SampleResult, host_to_device
from servelm.engine.sequence import Sequence


@dataclass(slots=True)
class StepResult:
    """Sequences that produced a token this step, with what they sampled."""

    seqs: list[Sequence]
    sample: SampleResult | None
    # (sequence, [(prompt token, its logprob, top alternatives)]) for sequences that asked for prompt logprobs
    prompt_logprobs: list[tuple[Sequence, list]] = field(default_factory=list)


@dataclass(slots=True)
class InflightStep:
    """A launched step whose sampled token ids are still on their way to the host (async scheduling)."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [rows] on the device; the next step reads its pending input tokens from here
    host: torch.Tensor  # their copy on the host (pinned), valid once ``event`` has completed
    event: torch.cuda.Event | None
    rows: dict[int, int]  # seq_id -> row of ``tokens``

    def token_ids(self) -> list[int]:
        """The sampled ids, in ``seqs`` order; waits for the step to finish on the device."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()

    def pending_input(self, seq: Sequence, row: int, rows: list[int], src: list[int]) -> None:
        """Record that batch row ``row`` takes ``seq``'s pending token from this step's output."""
        rows.append(row)
        src.append(self.rows[seq.seq_id])

    def fill(self, input_ids: torch.Tensor, rows: list[int], src: list[int]) -> None:
        """Write the recorded pending tokens into ``input_ids`` on the device (no host sync)."""
        if not rows:
            return
        n = len(rows)
        if rows == src == list(range(n)):  # steady decode: the same sequences in the same order
            input_ids[:n].copy_(self.tokens[:n])
            return
        dev = input_ids.device
        input_ids.index_copy_(0, host_to_device(rows, torch.int64, dev),
                              self.tokens.index_select(0, host_to_device(src, torch.int64, dev)))


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 kv_dtype: torch.dtype, sampler: Sampler | None, attention_backend: str = "auto"):
        cfg = model.config
        self.model = model
        self.device = device
        self.block_size = block_size
        self.sampler = sampler
        self.backend = get_backend(attention_backend, device, kv_dtype, cfg.head_dim)
        self.kv_caches = self.backend.allocate_kv_cache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads,
                                                        cfg.head_dim, kv_dtype, device)
        self.scale = cfg.head_dim ** -0.5
        # GGUF blocks on the CPU: the whole decoder runs in one native call per step (None: the torch model)
        from servelm.engine.native.forward import native_forward_for
        self.native_forward = native_forward_for(model, self.kv_caches, device) if cfg.llama_layout else None
        self.cuda_graph = None  # a CUDAGraphRunner for decode steps, set by the engine on CUDA
        self.workers = None  # rank 0 under tensor parallelism: the TensorParallel handle on the other ranks

    @staticmethod
    def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
        cfg = model.config
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> StepResult:
        """Compute the scheduled tokens and sample for sequences that are up to date afterwards.

        Without a sampler (a tensor-parallel worker) nothing is sampled and the result is empty.
        """
        if self.workers is not None:  # tensor parallel: the other ranks run this same step
            self.workers.call("run", pack_items(items))
        logits, samplers, prompt_lp = self._logits(items)
        if not samplers or self.sampler is None:
            return StepResult([], None, prompt_lp)
        if any(s.spec_token_ids for s in samplers):  # rows of k + 1 positions per speculating sequence
            from servelm.engine.speculative.verify import verify  # noqa: PLC0415

            return StepResult(samplers, verify(self.sampler, logits, samplers), prompt_lp)
        return StepResult(samplers, self.sampler(logits, samplers), prompt_lp)

    @torch.inference_mode()
    def launch(self, items: list[tuple[Sequence, int]], prev: InflightStep | None) -> InflightStep:
        """Queue this step's compute and sampling on the device and return without waiting for it.

        Pending tokens (``seq.pending_tokens``) are read from ``prev`` on the device. Every item must
        sample this step and need no host-side sampling state (``LLMEngine._overlappable``).
        """
        logits, samplers, _ = self._logits(items, prev)
        tokens = self.sampler.sample_on_device(logits, samplers)
        host, event = tokens, None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return InflightStep(samplers, tokens, host, event, {s.seq_id: i for i, s in enumerate(samplers)})

    def _logits(self, items: list[tuple[Sequence, int]], prev: InflightStep | None = None):
        """(logits of the rows to sample, their sequences, prompt logprobs); (None, [], ...) when none samples."""
        # graphs compute only the sampled rows: a step that scores prompt tokens runs eagerly
        if self.cuda_graph is not None and not any(
                (s.prompt_logprobs is not None and s.num_computed_tokens < s.num_prompt_tokens) or s.spec_token_ids
                for s, _ in items):
            out = self.cuda_graph.run(items, prev)  # None unless the step's rows fit a captured size
            if out is not None:
                return (*out, [])
        hidden, sample_rows, samplers, prompt_rows = self._forward(items, prev)
        prompt_lp = [(seq, self._prompt_logprobs(seq, hidden[row:row + count], pos))
                     for seq, row, pos, count in prompt_rows]
        if not samplers:
            return None, [], prompt_lp
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        return logits, samplers, prompt_lp

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, pos: int, chunk: int = 256) -> list:
        """(token, logprob, top-k, rank) of prompt tokens ``pos + 1 ...`` from the hidden states at ``pos ...``."""
        k = seq.params.prompt_logprobs
        out = []
        for i in range(0, hidden.shape[0], chunk):  # bounded memory: chunk x vocab floats at a time
            lp = torch.log_softmax(self.model.compute_logits(hidden[i:i + chunk]), dim=-1)
            targets = seq.token_ids[pos + 1 + i: pos + 1 + i + lp.shape[0]]
            col = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])
            chosen = col[:, 0].tolist()
            ranks = ((lp > col).sum(dim=1) + 1).tolist()  # the prompt token's rank in the vocabulary (vLLM's)
            if k:
                vals, ids = lp.topk(k, dim=-1)
                tops = [list(zip(r_ids, r_vals)) for r_ids, r_vals in zip(ids.tolist(), vals.tolist())]
            else:
                tops = [[] for _ in targets]
            out.extend(zip(targets, chosen, tops, ranks))
        return out

    @torch.inference_mode()
    def all_logits(self, seq: Sequence) -> torch.Tensor:
        """Logits at every position of ``seq``'s uncomputed tokens (scoring, perplexity, tests)."""
        n = seq.num_tokens - seq.num_computed_tokens
        if self.workers is not None:
            self.workers.call("all_logits", pack_items([(seq, n)]))
        hidden, _, _, _ = self._forward([(seq, n)])
        return self.model.compute_logits(hidden)

    def _forward(self, items: list[tuple[Sequence, int]], prev: InflightStep | None = None):
        prefills = [(s, n) for s, n in items if n > 1]
        decodes = [(s, n) for s, n in items if n == 1]
        ordered = prefills + decodes
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, tables, sample_rows, samplers = [], [], [], [], []
        prompt_rows = []  # (seq, first row, first position, rows) whose logits score the next prompt tokens
        pending_rows, pending_src = [], []  # rows whose token is still on the device, and where it is in prev
        bs = self.block_size
        for seq, n in ordered:
            start = seq.num_computed_tokens
            end = start + n
            if seq.prompt_logprobs is not None:  # positions first..last-1 predict prompt tokens not yet scored
                first, last = max(start, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_rows.append((seq, len(input_ids) + first - start, first, last - first))
            toks = (seq.token_ids + seq.spec_token_ids if seq.spec_token_ids else seq.token_ids)[start:end]
            if len(toks) < n:  # the last one was sampled by the step in flight (async scheduling)
                prev.pending_input(seq, len(input_ids) + len(toks), pending_rows, pending_src)
                toks = toks + [0]
            input_ids.extend(toks)
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(n)
            context_lens.append(end)
            tables.append(table)
            if end == seq.num_tokens_incl_pending + len(seq.spec_token_ids):
                # the last row, and the rows of the last known token and the proposals when speculating
                sample_rows.extend(range(len(input_ids) - 1 - len(seq.spec_token_ids), len(input_ids)))
                samplers.append(seq)
        dev = self.device
        max_blocks = max(len(t) for t in tables)
        if self.device.type == "cuda":  # a multiple of 16 columns: the Triton kernels' table stride (and the
            max_blocks = -(-max_blocks // 16) * 16  # decode rows' offset) take one specialisation, any context
        block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
        layout = BatchLayout(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=block_tables.to(dev, non_blocking=True),
            num_prefills=len(prefills),
            num_prefill_tokens=sum(n for _, n in prefills),
            context_lens_tensor=torch.tensor(context_lens, dtype=torch.int32).to(dev, non_blocking=True),
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True)
        if pending_rows:
            prev.fill(ids_t, pending_rows, pending_src)
        pos_t = torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True)
        if self.native_forward is not None:
            return self.native_forward(ids_t, pos_t, layout), sample_rows, samplers, prompt_rows
        if prefills and all(s.spec_token_ids for s, _ in prefills):
            # only verifications of proposals: each token attends as a decode row does (one batched kernel
            # instead of one call per sequence, and the same arithmetic as decoding without speculation)
            layout = as_decode_rows(layout)
        ctx = self.backend.make_context(layout, self.kv_caches, self.scale)
        return self.model(ids_t, pos_t, ctx), sample_rows, samplers, prompt_rows
