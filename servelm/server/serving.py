"""One generation request end to end: admission, rate limit, engine stream, metrics, settlement.

Routes turn their body into prompt token ids and SamplingParams, call :func:`start`, then either
collect the outputs or stream them. Whatever way the request ends (done, error, timeout, client
gone) :meth:`Generation.finish` runs once: tokens are settled with the rate limiter, the admission
slot is released, and metrics and the access-log fields are recorded.
"""
from __future__ import annotations

from contextlib import aclosing

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from fastapi import Request

from servelm.engine import InvalidRequestError, RequestOutput, SamplingParams
from servelm.server.auth import Principal
from servelm.server.context import ServerContext
from servelm.server.errors import APIError, ClientGone, from_engine, invalid
from servelm.server.rate_limit import Reservation
from servelm.serving.sampling import clamp_top_k, fold_seed


@dataclass(slots=True)
class Generation:
    """An admitted request and its running engine stream."""

    ctx: ServerContext
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    principal: Principal
    info: dict
    reservation: Reservation | None = None
    start: float = field(default_factory=time.perf_counter)
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    stream: AsyncIterator[RequestOutput] | None = None
    first: RequestOutput | None = None
    scheduled_at: float | None = None  # time.monotonic() the engine first scheduled it (its service starts)
    _finished: bool = False

    @property
    def rate_headers(self) -> dict[str, str]:
        """Returns the x-ratelimit-* headers of this request's key (empty when the key is unlimited)."""
        return self.reservation.headers if self.reservation is not None else {}

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Yields the engine's outputs (the prefetched first one included) until the request finishes.

        Raises APIError(504) past the request timeout. Closing this iterator aborts the engine request.
        """
        m = self.ctx.metrics
        deadline = self.start + self.ctx.settings.request_timeout_s
        last = None
        try:
            while True:
                if self.first is not None:
                    out, self.first = self.first, None
                else:
                    out = await _next(self.stream, deadline)
                if out is None:
                    break
                if self.scheduled_at is None and out.metrics is not None:
                    self.scheduled_at = out.metrics.first_scheduled_time
                now = time.perf_counter()
                new = sum(len(c.delta_token_ids) for c in out.outputs)
                if new:
                    if last is None:
                        m.ttft.observe(now - self.start)
                        _queue_time(m, out)
                    else:
                        m.itl.observe(now - last)
                    last = now
                    self.completion_tokens += new
                yield out
                if out.finished:
                    self.finish_reasons = [c.finish_reason or "stop" for c in out.outputs]
                    break
        finally:
            await self.finish()

    async def final(self) -> RequestOutput:
        """Drains :meth:`outputs` and returns the last one, whose choices hold the full text,
        token ids and (when requested) logprobs."""
        last = None
        async with aclosing(self.outputs()) as outputs:
            async for out in outputs:
                last = out
        return last

    async def finish(self) -> None:
        """Closes the engine stream (aborting it if unfinished) and records the request. Idempotent."""
        if self._finished:
            return
        self._finished = True
        try:
            if self.stream is not None:
                await self.stream.aclose()
        finally:
            ctx = self.ctx
            # Only finished requests say how long one takes to serve (an early abort would look fast).
            served = self.finish_reasons and self.scheduled_at is not None
            ctx.admission.leave(time.monotonic() - self.scheduled_at if served else None)
            if self.reservation is not None:
                try:
                    await ctx.limiter.settle(self.reservation, self.prompt_tokens + self.completion_tokens)
                except Exception:  # a Redis hiccup must not turn a served answer into an error
                    pass
            ctx.metrics.prompt_tokens.inc(self.prompt_tokens)
            ctx.metrics.generation_tokens.inc(self.completion_tokens)
            ctx.metrics.e2e.observe(time.perf_counter() - self.start)
            for reason in self.finish_reasons or ["abort"]:
                ctx.metrics.finished.labels(finished_reason=reason).inc()
            # a batched request's generations share the access-log fields: counts add up, reasons join
            info = self.info
            info["prompt_tokens"] = info.get("prompt_tokens", 0) + self.prompt_tokens
            info["completion_tokens"] = info.get("completion_tokens", 0) + self.completion_tokens
            reasons = ",".join(self.finish_reasons) or "abort"
            info["finish_reason"] = f"{info['finish_reason']},{reasons}" if info.get("finish_reason") else reasons


async def _next(stream, deadline: float):
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise _timeout()
    try:
        async with asyncio.timeout(remaining):
            return await anext(stream, None)
    except TimeoutError:
        raise _timeout() from None


def _timeout() -> APIError:
    return APIError(504, "The request took longer than the server's request timeout and was stopped.",
                    code="request_timeout")


def _queue_time(m, out: RequestOutput) -> None:
    rm = out.metrics
    if rm is not None and rm.first_scheduled_time is not None:
        m.queue_time.observe(max(0.0, rm.first_scheduled_time - rm.arrival_time))


def check_context(ctx: ServerContext, prompt_len: int, max_tokens: int | None, prompt_param: str) -> int | None:
    """Returns the effective max_tokens; raises APIError(400) naming both lengths when they don't fit."""
    limit = ctx.engine.max_model_len
    if prompt_len == 0:
        raise invalid("The prompt is empty.", prompt_param, "empty_prompt")
    if prompt_len >= limit:
        raise invalid(f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_len} "
                      "tokens. Shorten the prompt.", prompt_param, "context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > limit:
        raise invalid(f"This model's maximum context length is {limit} tokens, but you requested "
                      f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                      "completion). Lower max_tokens or shorten the prompt.", "max_tokens",
                      "context_length_exceeded")
    return max_tokens


async def start(ctx: ServerContext, request: Request, principal: Principal, prompt_ids: list[int],
                params: SamplingParams, prompt_param: str = "prompt") -> Generation:
    """Returns an admitted Generation whose first engine output is already in hand (see :func:`start_batch`)."""
    return (await start_batch(ctx, request, principal, [prompt_ids], params, prompt_param))[0]


async def start_batch(ctx: ServerContext, request: Request, principal: Principal, prompts: list[list[int]],
                      params: SamplingParams, prompt_param: str = "prompt") -> list[Generation]:
    """Returns one admitted Generation per prompt, each one engine request whose first output is in hand.

    The prompts run concurrently (the scheduler batches them); each takes an admission slot, and the
    batch is one request against the key's rate limit, its tokens the sum of the prompts'. Raises
    APIError 400 (bad input, also from the engine), 429 (rate limit), 503 (overloaded), 504 (timeout)
    or ClientGone when the client leaves while waiting; nothing of the batch keeps running then.
    """
    info = request.scope.setdefault("servelm", {})
    rid = info.get("request_id") or "req"
    fault = request.headers.get(FAULT_HEADER) if ctx.settings.enable_fault_injection else None
    if fault is not None:
        params = inject_fault(params, fault)
    for ids in prompts:
        check_context(ctx, len(ids), params.max_tokens, prompt_param)
    gens: list[Generation] = []
    try:
        for ids in prompts:
            try:
                ctx.admission.enter()
            except APIError as e:
                reason = "overloaded" if e.code == "server_overloaded" else "shutting_down"
                ctx.metrics.rejected.labels(reason=reason).inc()
                raise
            gens.append(Generation(ctx, rid, ids, params, principal, info))
        costs = [len(g.prompt_ids) + _budget(ctx, g) * params.n for g in gens]
        reservation = await rate_limit(ctx, principal, sum(costs))
        # each generation settles its own share of the reservation, so the shares add up to the batch's tokens
        for g, cost in zip(gens, costs):
            g.reservation = replace(reservation, tokens=cost if reservation.tpm > 0 else 0)
        deadline = time.perf_counter() + ctx.settings.request_timeout_s
        for g in gens:
            # Clients may reuse an x-request-id; the engine needs ids unique among live requests.
            g.stream = ctx.engine.generate(g.prompt_ids, params, request_id=f"{rid}-{uuid.uuid4().hex[:8]}")
        # Pull the first outputs now so the engine's validation errors become a 400, not a broken stream.
        firsts = await until_disconnect(request, gather_all([_next(g.stream, deadline) for g in gens]))
        for g, first in zip(gens, firsts):
            g.first = first
    except InvalidRequestError as e:
        await finish_all(gens)
        raise from_engine(e) from None
    except BaseException:
        await finish_all(gens)
        raise
    return gens


FAULT_HEADER = "x-servelm-fault"


class InjectedFault(RuntimeError):
    """Raised inside the engine step for a request that asked for it (test-only fault injection)."""


def inject_fault(params: SamplingParams, spec: str) -> SamplingParams:
    """Returns ``params`` with a logits processor that raises once the request has sampled ``N`` tokens,
    for the ``x-servelm-fault: sample:N`` header (``sample`` alone: at the first token). Honoured only
    with ``enable_fault_injection`` (tests), so one request can be made to fail inside the engine step.
    Raises APIError(400) for another value."""
    kind, _, count = spec.strip().partition(":")
    if kind != "sample" or not (count or "0").isdigit():
        raise invalid(f"{FAULT_HEADER} must be 'sample' or 'sample:N' (fail after N tokens), got {spec!r}.",
                      FAULT_HEADER)
    after = int(count or 0)

    def fail(output_ids, logits):
        if len(output_ids) >= after:
            raise InjectedFault(f"fault injected after {after} tokens")
        return logits
    return replace(params, logits_processors=[*(params.logits_processors or ()), fail])
async def rate_limit(ctx: ServerContext, principal: Principal, tokens: int) -> Reservation:
    """Returns the key's reservation of one request and ``tokens`` tokens. Raises APIError 429 (counted in
    the metrics) when a budget is spent, 503 when the rate-limit store is unreachable."""
    try:
        return await ctx.limiter.acquire(principal.name, principal.rpm, principal.tpm, tokens)
    except APIError as e:
        if e.status == 429:
            ctx.metrics.rate_limited.labels(key=principal.label, limit=e.code or "").inc()
        raise
    except Exception:
        raise APIError(503, "The rate-limit store is unreachable; retry shortly.", code="rate_limit_store_down",
                       headers={"Retry-After": "2"}) from None


def _budget(ctx: ServerContext, g: Generation) -> int:
    return g.params.max_tokens if g.params.max_tokens is not None else ctx.engine.max_model_len - g.prompt_tokens


async def finish_all(gens: list[Generation]) -> None:
    """Finishes every generation (aborting the unfinished ones)."""
    for g in gens:
        await g.finish()


async def gather_all(awaitables) -> list:
    """Returns the results of ``awaitables`` run concurrently; when one fails (or this is cancelled)
    the others are cancelled too, so nothing of a failed request keeps running."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merged_outputs(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yields ``(position in gens, output)`` from every generation's :meth:`Generation.outputs` as they
    come. Closing this iterator (or an error in one) stops and releases all of them."""
    streams = [g.outputs() for g in gens]
    pending = {asyncio.ensure_future(anext(s, None)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                out = task.result()
                if out is not None:
                    pending[asyncio.ensure_future(anext(streams[i], None))] = i
                    yield i, out
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await finish_all(gens)


async def until_disconnect(request: Request, awaitable):
    """Returns ``awaitable``'s result, or cancels it and raises ClientGone when the client disconnects."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def client_finish_reason(engine_reason: str | None) -> str | None:
    """The OpenAI finish reason for the engine's: an aborted request (the server ended it, e.g. on
    shutdown) reads as "stop"."""
    return "stop" if engine_reason == "abort" else engine_reason


def sampling_params(body, max_tokens: int | None, logprobs: int | None, vocab_size: int | None = None,
                    prompt_logprobs: int | None = None, structured_output=None) -> SamplingParams:
    """Returns SamplingParams from an OpenAI body; raises APIError(400) for values the engine refuses."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    top_k, top_p = clamp_top_k(body.top_k, vocab_size), body.top_p
    if top_p == 0:  # OpenAI allows top_p 0, the smallest nucleus: only the most likely token, which is top_k 1
        top_p, top_k = 1.0, 1
    seed = fold_seed(body.seed)
    logit_bias = None
    if body.logit_bias:  # OpenAI sends token ids as JSON object keys, so as strings
        try:
            logit_bias = {int(t): float(v) for t, v in body.logit_bias.items()}
        except ValueError:
            raise invalid("logit_bias keys must be token ids (integers, as strings).", "logit_bias") from None
    if body.prompt_logprobs is not None and body.stream:  # as vLLM: they come once, with the whole prompt
        raise invalid("prompt_logprobs is not available with stream=true.", "prompt_logprobs")
    if body.prompt_logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, body.prompt_logprobs)  # echo's logprobs share the prefill
    try:
        return SamplingParams(n=body.n, max_tokens=max_tokens, temperature=body.temperature, top_p=top_p,
                              top_k=top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              seed=seed, stop=stop, stop_token_ids=body.stop_token_ids or [],
                              include_stop_str_in_output=body.include_stop_str_in_output,
                              skip_special_tokens=body.skip_special_tokens, allowed_token_ids=body.allowed_token_ids,
                              bad_words=body.bad_words,
                              ignore_eos=body.ignore_eos, logprobs=logprobs,
                              min_tokens=body.min_tokens, prompt_logprobs=prompt_logprobs,
                              structured_output=structured_output, logit_bias=logit_bias,
                              speculative=body.speculative)
    except InvalidRequestError as e:
        raise from_engine(e) from None
