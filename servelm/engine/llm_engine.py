"""The synchronous engine core: add requests, then ``step()`` until they finish.

One step = schedule (a token budget over waiting and running sequences) → execute
(one forward pass over the packed batch, then sampling) → update (append tokens,
detokenize, stop rules, free finished sequences' blocks). Not thread-safe: the
``AsyncEngine`` drives it from a single thread.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from servelm.engine.config import EngineConfig
from servelm.engine.kv_cache import KVCacheManager
from servelm.engine.models.config import ModelLoadError
from servelm.engine.models.loader import LoadedModel, load_model
from servelm.engine.output_processor import OutputProcessor
from servelm.engine.quant.config import QuantConfig
from servelm.engine.outputs import RequestOutput
from servelm.engine.runner import ModelRunner
from servelm.engine.sampling import Sampler
from servelm.engine.sampling_params import InvalidRequestError, SamplingParams
from servelm.engine.scheduler import Scheduler, SchedulerConfig
from servelm.engine.sequence import Sequence
from servelm.engine.speculative import NgramProposer, SpeculativeConfig
from servelm.engine.speculative.draft import DraftModelProposer, check_draft_vocabulary
from servelm.engine.speculative.verify import VerifiedSample
from servelm.engine.structured_output import GrammarCompiler
from servelm.engine.tokenizer import TokenIdsOnly, Tokenizer

log = logging.getLogger("servelm.engine")


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_free: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_hit_rate: float
    num_preemptions: int
    steps: int
    prompt_tokens_computed: int  # prompt tokens actually run through the model (cache hits excluded)
    overlapped_steps: int  # steps launched before the previous one's tokens were read (async scheduling)
    spec_num_drafts: int = 0  # speculative decoding: verification steps of a sequence (vLLM's num_drafts)
    spec_num_draft_tokens: int = 0  # proposed tokens verified
    spec_num_accepted_tokens: int = 0  # of which accepted
    spec_num_emitted_tokens: int = 0  # tokens the verification steps produced (accepted + one per step)
    # [j]: verifications whose proposal at position j was accepted (vLLM's num_accepted_tokens_per_pos)
    spec_num_accepted_tokens_per_pos: tuple[int, ...] = ()
    healthy: bool = True


@dataclass(slots=True)
class _Request:
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None,
                 draft_loaded: LoadedModel | None = None):
        """Load the model (or reuse ``loaded``, already in this config's dtype and device) and size the KV pool;
        with a ``draft_model`` speculative config, load its draft too (or reuse ``draft_loaded``).

        Raises :class:`ModelLoadError` for a missing or unsupported model and ValueError for bad settings
        (a bad ``speculative_config`` before anything loads; a draft of another vocabulary).
        """
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        config.check_parallel(self.device)
        self.speculative = SpeculativeConfig.parse(config.speculative_config)
        if self.speculative is not None and config.tensor_parallel_size > 1:
            raise ValueError("speculative decoding does not combine with tensor parallelism yet; drop one of them")
        torch.manual_seed(config.seed)
        if loaded is None:
            # quantization=None: a quantized GGUF runs in its own blocks; "none" dequantizes it (the float path)
            loaded = load_model(config.model, self.dtype, self.device, config.max_model_len, config.seed,
                                progress=config.show_progress, download_dir=config.download_dir,
                                gguf_blocks=config.quantization is None, max_rows=config.max_num_seqs)
        self.loaded = loaded
        self.model_config = loaded.config
        self.model = loaded.model
        self.tokenizer = self._load_tokenizer(config, loaded)
        if config.quantization and QuantConfig.parse(config.quantization).method and _requantizes(loaded):
            log.warning("%s is already quantized (%s): --quantization %s dequantizes it and rounds the weights a "
                        "second time; without --quantization it runs in its own blocks, with no second rounding",
                        self.loaded.tokenizer_source, _requantizes(loaded), config.quantization)
        if config.quantization:
            from servelm.engine.quant import calibration_windows, quantize_model  # noqa: PLC0415 (optional subsystem)

            calib = None
            if config.quant_calibration:
                calib = calibration_windows(self.tokenizer, config.quant_calibration)
            self.quant_report = quantize_model(self.model, config.quantization, loaded.source_qtypes, calib,
                                               max_rows=config.max_num_seqs)
        self.max_model_len = self.model_config.max_position_embeddings
        self.model_name = config.served_model_name or _model_name(config.model, loaded.config.name)
        self.tp = None
        if config.tensor_parallel_size > 1:  # ``loaded`` (rank 0's copy) is sharded in place
            from servelm.engine.parallel import TensorParallel, check_shardable  # noqa: PLC0415

            check_shardable(self.model_config, config.tensor_parallel_size)
            self.tp = TensorParallel(config, config.tensor_parallel_size, self.device)
            weakref.finalize(self, self.tp.close)
        draft = None
        if self.speculative is not None and self.speculative.method == "draft_model":
            draft = draft_loaded or load_model(self.speculative.model, self.dtype, self.device, config.max_model_len,
                                               config.seed, download_dir=config.download_dir,
                                               gguf_blocks=config.quantization is None, max_rows=config.max_num_seqs)
            check_draft_vocabulary(draft, self.model_config.vocab_size, self.speculative.model)
        # the draft's pool holds as many blocks as the target's: the memory budget pays for both
        draft_block_bytes = ModelRunner.kv_bytes_per_block(draft.model, config.block_size, self.dtype) if draft else 0
        self.runner, num_blocks = build_runner(config, loaded, self.device, self.dtype,
                                               Sampler(self.tokenizer.eos_token_ids), draft_block_bytes)
        self.runner.workers = self.tp
        block_size = config.block_size
        long_after = getattr(getattr(loaded.model, "rope", None), "long_after", None)
        prefix_caching = config.enable_prefix_caching
        if long_after is not None and prefix_caching:
            # a block's K/V depend on whether its sequence ran with longrope's short or long factors, which
            # the prefix cache's token hashes do not say
            log.info("prefix caching is off: longrope rotates a prefix differently in short and long sequences")
            prefix_caching = False
        cfg = self.model_config
        windows = {cfg.window(i) for i in range(cfg.num_layers)}
        # blocks out of the window are released only where every layer has that window
        window = windows.pop() if len(windows) == 1 and None not in windows else None
        self.kv = KVCacheManager(num_blocks, block_size, prefix_caching, window)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.prefill_chunk_size,
                            long_context_after=long_after), self.kv)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        self.output = OutputProcessor(self.tokenizer, self.tokenizer.eos_token_ids, self.max_model_len)
        self.requests: dict[str, _Request] = {}
        self.proposer = None
        if draft is not None:
            self.proposer = DraftModelProposer(self.speculative, draft, num_blocks, block_size, self.device,
                                               self.dtype, config.attention_backend)
        elif self.speculative is not None:
            self.proposer = NgramProposer(self.speculative)
        self.spec_counts = [0, 0, 0, 0]  # drafts, draft tokens, accepted, emitted
        self.spec_accepted_per_pos = [0] * (self.speculative.num_speculative_tokens if self.speculative else 0)
        self._failed: list[RequestOutput] = []  # outputs of requests that failed in this step (see _fail_request)
        # Async scheduling pays off where the device runs apart from the host (CUDA); on CPU it would only
        # hold each token back one step. Tensor-parallel workers receive token ids, so it is off there.
        # Speculative steps need the sampled tokens on the host to propose the next ones: no overlap then.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type == "cuda") and self.tp is None and self.proposer is None
        self._inflight = None  # the launched step whose tokens are not read yet (async scheduling)
        self.overlapped_steps = 0
        self.steps = 0
        self.prompt_tokens_computed = 0
        from servelm.engine.memory import peak_rss  # noqa: PLC0415
        from servelm.engine.quant.apply import model_weight_bytes  # noqa: PLC0415

        self.weight_bytes = model_weight_bytes(self.model)
        self.kv_bytes = num_blocks * ModelRunner.kv_bytes_per_block(self.model, block_size, self.dtype)
        log.info("engine ready: model=%s device=%s dtype=%s weights=%s kv_blocks=%d x %d tokens tensor_parallel=%d",
                 self.model_name, self.device, self.dtype, _weights_label(loaded), num_blocks, block_size,
                 config.tensor_parallel_size)
        log.info("memory: weights %.1f MiB, KV cache %.1f MiB, peak RSS %.1f MiB", self.weight_bytes / 2**20,
                 self.kv_bytes / 2**20, peak_rss() / 2**20)

    def shutdown(self) -> None:
        """Stop tensor-parallel workers, if any (also done at garbage collection and exit)."""
        if self.tp is not None:
            self.tp.close()

    # -- requests ------------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(config: EngineConfig, loaded: LoadedModel) -> Tokenizer | TokenIdsOnly:
        """The model's tokenizer, ``config.tokenizer``'s, or none (``skip_tokenizer_init``). Dummy weights
        borrow the embedded model's tokenizer, and go without one where that model is not installed (a GPU
        machine that only runs benchmarks)."""
        cfg = loaded.config
        if config.skip_tokenizer_init:
            return TokenIdsOnly(cfg.vocab_size, cfg.eos_token_ids)
        src = loaded.tokenizer_source
        if config.tokenizer:
            from servelm.engine.models.loader import resolve_tokenizer

            src = resolve_tokenizer(config.tokenizer, config.download_dir)
        elif src is None:
            from servelm.engine.models.loader import default_model_path

            try:
                src = default_model_path()
            except ModelLoadError:
                log.warning("dummy weights without the embedded model's tokenizer: token-id prompts only")
                return TokenIdsOnly(cfg.vocab_size, cfg.eos_token_ids)
        return Tokenizer.from_source(src, cfg.eos_token_ids)

    def tokenize_prompt(self, prompt: str | list[int] | dict,
                        params: SamplingParams | None = None) -> tuple[str | None, list[int]]:
        """Return (text or None, token ids) of a text, a list of token ids, or vLLM's ``{"prompt": text}`` /
        ``{"prompt_token_ids": ids}`` dict; with ``params.truncate_prompt_tokens`` only the last k ids.

        Raises :class:`InvalidRequestError` for an empty or bad prompt."""
        text, ids = self._tokenize(prompt_from_dict(prompt) if isinstance(prompt, dict) else prompt)
        k = params.truncate_prompt_tokens if params is not None else None
        if k is not None:
            ids = ids[-(self.max_model_len if k == -1 else k):]
        return text, ids

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty.", "prompt")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequestError("prompt tokenizes to no tokens.", "prompt")
            return prompt, ids
        if not isinstance(prompt, (list, tuple)):
            raise InvalidRequestError(f"a prompt must be a string, a list of token ids or a dict with 'prompt' or "
                                      f"'prompt_token_ids'; got {type(prompt).__name__}.", "prompt")
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt must not be empty.", "prompt")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}).", "prompt")
        return None, ids

    def resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The completion budget in tokens; raises :class:`InvalidRequestError` when it cannot fit.

        ``max_tokens=None`` means "as much as fits": up to the context window and the KV pool.
        """
        limit = self.max_model_len
        capacity = self.kv.num_blocks * self.kv.block_size  # one sequence can never outgrow the pool
        if num_prompt_tokens >= limit:
            raise InvalidRequestError(
                f"the prompt is {num_prompt_tokens} tokens, but this model's context window is {limit} tokens; "
                "shorten the prompt.", "prompt")
        if params.max_tokens is None:
            max_tokens = min(limit, capacity) - num_prompt_tokens
            if max_tokens < 1:
                raise InvalidRequestError(
                    f"the prompt is {num_prompt_tokens} tokens, but the KV cache holds only {capacity}; "
                    "shorten the prompt.", "prompt")
            return max_tokens
        max_tokens = params.max_tokens
        if num_prompt_tokens + max_tokens > limit:
            raise InvalidRequestError(
                f"this model's context window is {limit} tokens, but {num_prompt_tokens + max_tokens} were requested "
                f"({num_prompt_tokens} in the prompt, {max_tokens} for the completion); reduce max_tokens or the "
                "prompt.", "max_tokens")
        if num_prompt_tokens + max_tokens > capacity:
            raise InvalidRequestError(
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} prompt + {max_tokens} completion) "
                f"do not fit the KV cache, which holds {capacity} tokens; reduce max_tokens.", "max_tokens")
        return max_tokens

    def validate_params(self, params: SamplingParams) -> None:
        """Check ``params`` against this engine: every field in range and every token id it carries inside
        the model's vocabulary (the one rule, :meth:`SamplingParams.validate`, with the vocabulary size).

        Raises :class:`InvalidRequestError` naming the field; also for features that need a tokenizer when
        the engine has none. Fills ``params.bad_words_token_ids`` from the tokenizer."""
        if isinstance(self.tokenizer, TokenIdsOnly):
            for name in ("stop", "bad_words", "structured_output"):
                if getattr(params, name):
                    raise InvalidRequestError(f"{name} needs a tokenizer, and this engine has none "
                                              "(skip_tokenizer_init).", name)
        if params.bad_words and params.bad_words_token_ids is None:
            params.bad_words_token_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
        params.validate(self.model_config.vocab_size)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, prompt_ids: list[int] | None = None) -> None:
        """Queue a request; raises :class:`InvalidRequestError` (and queues nothing) for bad input."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use.", "request_id")
        self.validate_params(params)
        if prompt_ids:  # already tokenized (and truncated) by the caller (AsyncEngine does it off the step thread)
            text, ids = (prompt if isinstance(prompt, str) else None), prompt_ids
        else:
            text, ids = self.tokenize_prompt(prompt, params)
        max_tokens = self.resolve_max_tokens(len(ids), params)
        grammar = self.grammars.compile(params.structured_output) if params.structured_output else None
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = [Sequence(request_id, i, ids, params, arrival, max_tokens) for i in range(params.n)]
        for s in seqs if grammar is not None else ():
            s.grammar = self.grammars.matcher(grammar)  # one per completion: each walks its own path
        for s in seqs[1:]:
            s.wait_for = seqs[0]
        self.requests[request_id] = _Request(text, ids, seqs, arrival)
        for s in seqs:
            self.scheduler.add(s)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV blocks now; returns its final output (or None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = s.finish_reason or "abort"
                self.scheduler.finish(s)
        return self.output.make_output(request_id, req.prompt, req.prompt_ids, req.seqs, req.arrival_time, True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the outputs of requests that changed.

        With async scheduling (on by default on CUDA) a run of plain decode steps overlaps: the call
        that launches step k returns step k-1's tokens, so the host's work (detokenizing, stop rules,
        scheduling) runs while the device computes. Anything else (a new request, logprobs, penalties,
        a grammar, a sequence about to reach its length limit) first drains the step in flight.
        """
        inflight = self._inflight
        if inflight is not None and not self._can_continue_overlap():
            self._inflight = None
            return self._finish_inflight(inflight)  # nothing new runs in this call
        if self.proposer is not None:
            self._propose()
        batch = self.scheduler.schedule()
        if not batch.items:
            return []
        self.steps += 1
        if inflight is None and not self._may_overlap(batch.items):
            items, result = self._run_isolating(batch.items)
            # proposals count as computed only once accepted (_append_verified)
            self._account([(s, n - len(s.spec_token_ids)) for s, n in items])
            touched: dict[str, None] = {}
            for seq, entries in result.prompt_logprobs if result is not None else ():
                self._guarded(seq, self.output.append_prompt_logprobs, seq, entries)
            sample = result.sample if result is not None else None
            if isinstance(sample, VerifiedSample):
                for seq, toks, lps, k in zip(result.seqs, sample.token_ids, sample.logprobs, sample.num_proposed):
                    if not seq.finished:
                        self._append_verified(seq, toks, lps, k, touched)
            elif sample is not None:
                for seq, tok, lp in zip(result.seqs, sample.token_ids, sample.logprobs):
                    if not seq.finished:  # a sibling's failure may have ended it
                        self._append(seq, tok, lp, touched)
            for seq, _ in items:
                seq.spec_token_ids = []
            if self.proposer is not None:
                self.proposer.release_finished()
            return self._outputs(touched)
        if inflight is not None and len(batch.items) != len(self.scheduler.running):
            # _can_continue_overlap rules this out: a pending token is read only by the very next step
            raise RuntimeError("async scheduling left a running sequence unscheduled")
        launched = self.runner.launch(batch.items, inflight)
        outputs = self._finish_inflight(inflight) if inflight is not None else []
        live = [(seq, n) for seq, n in batch.items if not seq.finished]  # not stopped by the token just read
        self._account(live)
        for seq, _ in live:
            seq.pending_tokens = 1
        self._inflight = launched
        self.overlapped_steps += inflight is not None
        return outputs

    def _run_isolating(self, items: list[tuple[Sequence, int]]):
        """Returns (the items that ran, their StepResult or None when none is left) of ``runner.run(items)``.

        When the step raises, each item runs alone to find the sequences whose step fails by itself
        (a logits processor, a grammar, bad sampling state); their requests fail (an output with
        ``error`` set) and the step runs again without them. Seeded generators are rewound before
        every run, so the others' samples are the ones they would have drawn in a batch without the
        failed requests. Raises what the step raised when no item fails alone, or when the items of
        several requests all do (then the fault is the engine's, not a request's), and what the step
        without them raises (then every request of the step fails)."""
        seeded = [(s, s.generator.get_state()) for s, _ in items if s.generator is not None]
        try:
            return items, self.runner.run(items)
        except Exception as exc:
            culprits: dict[str, Exception] = {}
            for item in items:
                for seq, state in seeded:
                    seq.generator.set_state(state)
                try:
                    self.runner.run([item])
                except Exception as e:  # this sequence's step fails on its own: it is the request's fault
                    culprits.setdefault(item[0].request_id, e)
            rest = [(s, n) for s, n in items if s.request_id not in culprits]
            if not culprits or (not rest and len({s.request_id for s, _ in items}) > 1):
                raise exc
            log.warning("engine step failed for %d request(s); retrying the step without them: %r",
                        len(culprits), exc)
            items = rest
            for seq, state in seeded:
                seq.generator.set_state(state)
            result = self.runner.run(items) if items else None  # if this raises too, every request fails
            for rid, e in culprits.items():
                self._fail_request(rid, e)
            return items, result

    def _guarded(self, seq: Sequence, fn, *args) -> bool:
        """Returns whether ``fn(*args)`` ran; when it raises, only ``seq``'s request fails."""
        try:
            fn(*args)
            return True
        except Exception as e:  # detokenizing, stop rules, a grammar: one sequence's state, one request's failure
            log.warning("request %s failed after its step: %r", seq.request_id, e)
            self._fail_request(seq.request_id, e)
            return False

    def _fail_request(self, request_id: str, error: Exception) -> None:
        """End the request with finish_reason ``error`` and free its blocks; its output (with ``error`` set)
        goes out with this step's outputs."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "error"
                self.scheduler.finish(s)
        out = self.output.make_output(request_id, req.prompt, req.prompt_ids, req.seqs, req.arrival_time, True)
        out.error = f"{type(error).__name__}: {error}"
        self._failed.append(out)

    def _overlappable(self, seq: Sequence) -> bool:
        """Whether ``seq`` can take part in an overlapped step: its sampling needs nothing the previous
        token changes on the host, and the token it samples cannot be its last by length."""
        p = seq.params
        return (seq.grammar is None and p.logprobs is None and p.prompt_logprobs is None and seq.generator is None
                and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and not p.bad_words_token_ids and not p.logits_processors
                and seq.num_output_tokens >= p.min_tokens
                and seq.num_output_tokens + seq.pending_tokens + 1 < seq.max_tokens
                and seq.num_tokens_incl_pending + 1 < self.max_model_len)

    def _may_overlap(self, items: list[tuple[Sequence, int]]) -> bool:
        """Whether to launch this (first) step without waiting for it: every item samples and can go on."""
        return (self.async_scheduling and not self.scheduler.waiting
                and all(s.num_computed_tokens + n == s.num_tokens and self._overlappable(s) for s, n in items))

    def _can_continue_overlap(self) -> bool:
        """Whether the next step can be launched before the one in flight is read: plain decodes of the
        same running sequences, all scheduled at once, with free blocks for all of them (no preemption)."""
        running = self.scheduler.running
        if self.scheduler.waiting or not running or len(running) > self.scheduler.config.max_num_batched_tokens:
            return False
        bs = self.kv.block_size
        need = 0
        for s in running:
            if s.pending_tokens != 1 or not self._overlappable(s):
                return False
            need += len(s.block_table) * bs <= s.num_computed_tokens
        return need <= self.kv.num_free_blocks

    def _finish_inflight(self, inflight) -> list[RequestOutput]:
        """Read the step in flight's tokens and apply them (aborted or stopped sequences drop theirs)."""
        touched: dict[str, None] = {}
        for seq, tok in zip(inflight.seqs, inflight.token_ids()):
            if seq.finished:
                continue
            seq.pending_tokens = 0
            self._append(seq, tok, None, touched)
        return self._outputs(touched)

    def _account(self, items: list[tuple[Sequence, int]]) -> None:
        """Count the step's computed tokens and register blocks they filled for prefix reuse."""
        for seq, n in items:
            prev = seq.num_computed_tokens
            seq.num_computed_tokens += n
            if prev < seq.num_prompt_tokens:
                self.prompt_tokens_computed += min(seq.num_computed_tokens, seq.num_prompt_tokens) - prev
            self.kv.cache_full_blocks(seq, prev)
            self.kv.release_out_of_window(seq)

    def _speculable(self, seq: Sequence) -> bool:
        """Whether ``seq`` may verify proposals: its sampling at each proposed position is the same
        function of the logits (no penalties, grammar, bad words or logits processors, which read the
        output so far; min_tokens already reached), and the request did not opt out."""
        p = seq.params
        return (p.speculative and seq.grammar is None and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty and not p.bad_words_token_ids and not p.logits_processors
                and seq.num_output_tokens >= p.min_tokens
                # a draft model's guesses are verified exactly only for greedy requests so far: sampled
                # verification of them was measured to bias the output distribution, so it stays off
                and (p.temperature == 0 or self.speculative.method != "draft_model"))

    def _propose(self) -> None:
        """Set each running decode's ``spec_token_ids`` for this step (none while the batch is larger than
        ``disable_by_batch_size``), never more than its max_tokens and the context window leave room for."""
        running = self.scheduler.running
        for s in running:
            s.spec_token_ids = []
        if len(running) > self.speculative.disable_by_batch_size:
            return
        seqs, limits = [], []
        for s in running:
            if s.num_tokens - s.num_computed_tokens != 1 or s.pending_tokens or not self._speculable(s):
                continue
            # the step emits up to k + 1 tokens: k proposals and the target's next one
            room = min(s.max_tokens - s.num_output_tokens, self.max_model_len - s.num_tokens) - 1
            if room >= 1:
                seqs.append(s)
                limits.append(room)
        for s, drafts in zip(seqs, self.proposer.propose(seqs, limits) if seqs else ()):
            s.spec_token_ids = list(drafts)

    def _append_verified(self, seq: Sequence, toks: list[int], lps: list, num_proposed: int,
                         touched: dict[str, None]) -> None:
        """Append a verification's tokens until one finishes ``seq``; then count the accepted proposals
        as computed (their K/V are in the cache), register the full blocks they fill, and free the
        blocks that only rejected proposals used."""
        prev = seq.num_computed_tokens
        for tok, lp in zip(toks, lps):
            self._append(seq, tok, lp, touched)
            if seq.finished:
                break
        if num_proposed:
            c = self.spec_counts
            c[0] += 1
            c[1] += num_proposed
            c[2] += len(toks) - 1
            c[3] += len(toks)
            for j in range(len(toks) - 1):
                self.spec_accepted_per_pos[j] += 1
        if seq.finished:
            return
        seq.num_computed_tokens = seq.num_tokens - 1  # the last token (the target's own) is computed next step
        self.kv.cache_full_blocks(seq, prev)
        self.kv.trim(seq, seq.num_tokens)
        self.kv.release_out_of_window(seq)

    def _append(self, seq: Sequence, token: int, lp, touched: dict[str, None]) -> None:
        if not self._guarded(seq, self.output.append_token, seq, token, lp):
            return
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
        touched[seq.request_id] = None

    def _outputs(self, touched: dict[str, None]) -> list[RequestOutput]:
        outputs, self._failed = self._failed, []
        for rid in touched:
            req = self.requests.get(rid)
            if req is None:  # aborted meanwhile
                continue
            done = all(s.finished for s in req.seqs)
            outputs.append(self.output.make_output(rid, req.prompt, req.prompt_ids, req.seqs, req.arrival_time, done))
            if done:
                del self.requests[rid]
        return outputs

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits ``[len(token_ids), vocab]`` at every position, through the paged-cache path.

        Runs outside the scheduler (call it between steps, not concurrently with them).
        """
        seq = Sequence("__score__", 0, token_ids, SamplingParams(max_tokens=1), time.monotonic(), 1)
        if not self.kv.allocate(seq, len(token_ids)):
            raise InvalidRequestError(f"{len(token_ids)} tokens do not fit the free KV cache", "prompt")
        try:
            return self.runner.all_logits(seq)
        finally:
            self.kv.free(seq)

    def stats(self) -> EngineStats:
        kv = self.kv.stats()
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=kv.num_blocks, kv_blocks_used=kv.used, kv_blocks_cached=kv.cached,
            kv_blocks_free=kv.free, kv_usage=kv.usage, prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits, prefix_hit_rate=kv.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, steps=self.steps,
            prompt_tokens_computed=self.prompt_tokens_computed, overlapped_steps=self.overlapped_steps,
            spec_num_drafts=self.spec_counts[0], spec_num_draft_tokens=self.spec_counts[1],
            spec_num_accepted_tokens=self.spec_counts[2], spec_num_emitted_tokens=self.spec_counts[3],
            spec_num_accepted_tokens_per_pos=tuple(self.spec_accepted_per_pos))


def build_runner(config: EngineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype,
                 sampler: Sampler | None, extra_bytes_per_block: int = 0) -> tuple[ModelRunner, int]:
    """The model runner over ``loaded`` (sharded first under tensor parallelism) and its KV pool's block count
    (each block costing ``extra_bytes_per_block`` more of the budget: a draft model's pool of as many blocks).

    Every tensor-parallel rank calls this in the same order: the memory profile, the pool size agreed
    as the minimum over ranks, and the CUDA-graph captures all run collectives.
    """
    model = loaded.model
    world = config.tensor_parallel_size
    if world > 1:
        from servelm.engine.parallel import agree_min, shard_model  # noqa: PLC0415

        shard_model(model, torch.distributed.get_rank(), world)
    if device.type == "cuda" and dtype != torch.float32 and config.attention_backend != "torch":
        from servelm.engine.fused import install_fused_kernels  # noqa: PLC0415 (CUDA only)

        install_fused_kernels(model)
    max_model_len = loaded.config.max_position_embeddings
    num_blocks = config.num_kv_blocks or _num_kv_blocks(config, model, device, dtype, max_model_len,
                                                        extra_bytes_per_block)
    if world > 1:
        num_blocks = agree_min(num_blocks, device)
    runner = ModelRunner(model, num_blocks, config.block_size, device, dtype, sampler, config.attention_backend)
    if device.type == "cuda" and not config.enforce_eager and runner.backend.name == "triton":
        from servelm.engine.cuda_graph import CUDAGraphRunner  # noqa: PLC0415 (CUDA only)

        runner.cuda_graph = CUDAGraphRunner(runner, config.max_num_seqs, max_model_len)
    return runner, num_blocks


def _num_kv_blocks(config: EngineConfig, model, device: torch.device, dtype: torch.dtype, max_model_len: int,
                   extra_bytes_per_block: int = 0) -> int:
    per_block = ModelRunner.kv_bytes_per_block(model, config.block_size, dtype) + extra_bytes_per_block
    if config.kv_cache_memory_bytes:
        budget = config.kv_cache_memory_bytes
    elif device.type == "cuda":
        from servelm.engine.memory import profile_kv_budget

        budget = profile_kv_budget(SimpleNamespace(model=model, config=config, device=device, dtype=dtype,
                                                   max_model_len=max_model_len), config.gpu_memory_utilization)
    else:
        from servelm.engine.memory import cpu_kv_budget

        budget = cpu_kv_budget(per_block, config.block_size, max_model_len, config.max_num_seqs)
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(f"the KV cache budget ({budget} bytes) holds no {per_block}-byte block")
    return int(blocks)


def _weights_label(loaded: LoadedModel) -> str:
    """How the weights are held: "gguf Q4_1/Q8_0" (their own blocks) or "dense"."""
    from servelm.engine.quant.gguf_blocks import GGUFBlockLinear  # noqa: PLC0415

    kinds = sorted({q for m in loaded.model.modules() if isinstance(m, GGUFBlockLinear) for q in m.qtypes})
    return "gguf " + "/".join(kinds) if kinds else "dense"


def _requantizes(loaded: LoadedModel) -> str | None:
    """The quantized GGUF type(s) of the loaded float weights, e.g. "Q4_1", when they came from quantized blocks."""
    kinds = sorted({t for t in loaded.source_qtypes.values() if t not in ("F32", "F16", "BF16")})
    return "/".join(kinds) or None


def prompt_from_dict(prompt: dict) -> str | list[int]:
    """The text or token ids of vLLM's ``TextPrompt`` (``{"prompt": str}``) or ``TokensPrompt``
    (``{"prompt_token_ids": [int, ...]}``); raises :class:`InvalidRequestError` naming a missing or bad key."""
    keys = set(prompt)
    if keys == {"prompt"}:
        if not isinstance(prompt["prompt"], str):
            raise InvalidRequestError("prompt['prompt'] must be a string (use 'prompt_token_ids' for token ids).",
                                      "prompt.prompt")
        return prompt["prompt"]
    if keys == {"prompt_token_ids"}:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)):
            raise InvalidRequestError("prompt['prompt_token_ids'] must be a list of token ids.",
                                      "prompt.prompt_token_ids")
        return list(ids)
    other = sorted(keys - {"prompt", "prompt_token_ids"})
    if other:
        raise InvalidRequestError(f"prompt dict key {other[0]!r} is not supported; give 'prompt' (text) or "
                                  "'prompt_token_ids' (token ids).", f"prompt.{other[0]}")
    raise InvalidRequestError("a prompt dict needs exactly one of 'prompt' (text) or 'prompt_token_ids' "
                              f"(token ids); got {', '.join(map(repr, sorted(keys))) or 'no keys'}.", "prompt")


def bad_words_token_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word's token ids, as vLLM derives them: the word as written, plus its form with a leading space
    (a word in mid-text) when that is a different token sequence of the same length."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return out


def _model_name(model: str | None, config_name: str) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    if model.startswith("dummy:"):
        return model
    from pathlib import Path

    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.name
