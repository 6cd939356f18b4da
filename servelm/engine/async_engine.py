"""The online engine: an asyncio front over ``LLMEngine`` stepping in its own thread.

The step loop never runs on the event loop. Requests reach it through a thread-safe
inbox; outputs come back through ``loop.call_soon_threadsafe`` into one queue per
request. Closing a ``generate()`` iterator early (a client hung up) aborts the request,
and the engine thread frees its KV blocks before its next step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator

from servelm.engine.config import EngineConfig
from servelm.engine.llm_engine import EngineStats, LLMEngine
from servelm.engine.outputs import RequestOutput
from servelm.engine.sampling_params import InvalidRequestError, SamplingParams
from servelm.engine.warmup import warm_up

log = logging.getLogger("servelm.engine")


class EngineDeadError(RuntimeError):
    """The engine is not running (not started, stopped, or its step loop failed)."""


class RequestFailedError(RuntimeError):
    """The engine failed this one request inside a step (e.g. its logits processor raised); the step went
    on without it and every other request is unaffected."""


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None):
        self.config = config or EngineConfig()
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stats: EngineStats | None = None
        self._stats_time = 0.0
        self.last_step_time = 0.0
        self.healthy = False
        self.warmup_report: dict | None = None  # what servelm.engine.warmup did at start

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (off the event loop) and start the step thread."""
        self._loop = asyncio.get_running_loop()
        if self.engine is None:
            self.engine = await asyncio.to_thread(LLMEngine, self.config)
        # CUDA: every kernel shape compiled and captured before the first request (a no-op on the CPU)
        self.warmup_report = await asyncio.to_thread(warm_up, self.engine)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="servelm-engine", daemon=True)
        self._thread.start()
        self.healthy = True
        self._stats = self.engine.stats()

    async def shutdown(self) -> None:
        """Stop the step thread; in-flight requests end with finish_reason ``abort``."""
        self._stopping.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.healthy = False

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def get_tokenizer(self):
        """The Hugging Face tokenizer (vLLM's ``await engine.get_tokenizer()``); ``tokenizer`` is servelm's wrapper."""
        return self.engine.tokenizer.hf

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        """A recent snapshot (at most ~50 ms old while busy) of queue depths and KV usage."""
        if self._stats is None:
            raise EngineDeadError("the engine has not started")
        return self._stats

    # -- requests --------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                       request_id: str | None = None, *,
                       sampling_params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; the last one has ``finished=True``.

        ``prompt`` is a text, token ids, or vLLM's ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``;
        ``sampling_params=`` is vLLM's name for ``params`` (default: ``SamplingParams()``).
        Raises :class:`InvalidRequestError` for bad input before anything is queued,
        :class:`EngineDeadError` if the engine is not running (or its step failed for every request), and
        :class:`RequestFailedError` if the engine failed this request alone (the others go on).
        """
        if params is not None and sampling_params is not None:
            raise TypeError("pass params or sampling_params, not both")
        params = params or sampling_params or SamplingParams()
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        rid = request_id or uuid.uuid4().hex
        if rid in self._streams:
            raise InvalidRequestError(f"request id {rid!r} is already in use.", "request_id")
        eng = self.engine
        eng.validate_params(params)  # here, not only on the step thread: a bad request never gets a stream
        text, ids = await asyncio.to_thread(eng.tokenize_prompt, prompt, params)
        eng.resolve_max_tokens(len(ids), params)
        if params.structured_output is not None:  # compile off the step thread; add_request hits the cache
            await asyncio.to_thread(eng.grammars.compile, params.structured_output)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = stream
        self._inbox.put(("add", rid, text if text is not None else prompt, ids, params, time.monotonic()))
        finished = False
        try:
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                while not stream.empty():  # the consumer fell behind: merge what piled up
                    nxt = stream.get_nowait()
                    if isinstance(nxt, BaseException):
                        raise nxt
                    out = _merge(out, nxt)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._inbox.put(("abort", rid))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the engine's next step."""
        self._inbox.put(("abort", request_id))
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while not self._stopping.is_set():
            block = not eng.has_unfinished_requests()
            self._drain_inbox(block)
            if self._stopping.is_set():
                break
            try:
                outputs = eng.step()
            except Exception as e:  # not one request's fault (LLMEngine isolates those): fail them all, go on
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self.last_step_time = time.monotonic()
            finished_any = any(o.finished for o in outputs)
            if finished_any or self.last_step_time - self._stats_time > 0.05 or not eng.has_unfinished_requests():
                # before dispatching, so a client that sees its request finish also sees its blocks freed
                self._stats, self._stats_time = eng.stats(), self.last_step_time
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)
        for rid in list(eng.requests):
            out = eng.abort_request(rid)
            if out is not None:
                self._loop.call_soon_threadsafe(self._dispatch, [out])
        self._stats = eng.stats()

    def _drain_inbox(self, block: bool) -> None:
        eng = self.engine
        while True:
            try:
                msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block:
                    self._stats, self.last_step_time = eng.stats(), time.monotonic()  # idle heartbeat
                    if self._stopping.is_set():
                        return
                    continue
                return
            block = False
            kind = msg[0]
            if kind == "add":
                _, rid, prompt, ids, params, arrival = msg
                try:
                    eng.add_request(rid, prompt, params, arrival, prompt_ids=ids)
                except Exception as e:
                    self._loop.call_soon_threadsafe(self._deliver, rid, e)
            elif kind == "abort":
                eng.abort_request(msg[1])
                self._stats = eng.stats()

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
            self._loop.call_soon_threadsafe(self._deliver, rid, EngineDeadError(f"engine step failed: {error}"))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.error is not None:
                self._deliver(out.request_id, RequestFailedError(out.error))
            else:
                self._deliver(out.request_id, out)

    def _deliver(self, rid: str, item) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.put_nowait(item)


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Fold output ``b`` into the earlier ``a``: cumulative fields from ``b``, deltas concatenated."""
    by_index = {o.index: o for o in a.outputs}
    for o in b.outputs:
        prev = by_index.get(o.index)
        if prev is None:
            continue
        o.delta_text = prev.delta_text + o.delta_text
        o.delta_token_ids = prev.delta_token_ids + o.delta_token_ids
        if o.delta_logprobs is not None and prev.delta_logprobs is not None:
            o.delta_logprobs = prev.delta_logprobs + o.delta_logprobs
    return b
