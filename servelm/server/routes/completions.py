"""POST /v1/completions: OpenAI (legacy) text completions, streaming and not, one prompt or a batch.

A batch (``prompt`` as a list of texts or of token-id lists) runs one engine request per prompt,
concurrently; choice ``j`` of prompt ``i`` has index ``i * n + j`` and the usage is summed. A single
prompt is a batch of one. Each prompt is checked and guarded on its own: a prompt held for review or
blocked answers only its own choices (with ``finish_reason: content_filter``); when every prompt is
blocked the request gets the 400.
"""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from servelm.server import sse, structured
from servelm.server.auth import Principal, require
from servelm.server.context import ServerContext, get_context
from servelm.server.errors import APIError, invalid
from servelm.server.logprobs import (TextOffsets, completion_logprobs, prompt_completion_logprobs,
                                    vllm_prompt_logprobs)
from servelm.serving.pipeline import Answer, run_stream_stages
from servelm.server.schemas import Completion, CompletionChoice, CompletionRequest
from servelm.safety import FallbackResult
from servelm.serving.guard import call_engine, fallback_headers
from servelm.server.serving import (Generation, check_context, client_finish_reason, finish_all, gather_all,
                                    sampling_params, start_batch, until_disconnect)
from servelm.server.streaming import stream_events, usage

router = APIRouter(tags=["openai"])

MAX_PROMPTS = 256  # prompts in one request (OpenAI's own batch limit is 2048; each prompt is an engine request)


def _prompts(ctx: ServerContext, body: CompletionRequest) -> list[tuple[list[int], str]]:
    """Returns each prompt's token ids and text (for echo); raises APIError(400) naming ``prompt``."""
    p = body.prompt
    batch = [p] if isinstance(p, str) or not p or isinstance(p[0], int) else list(p)
    # each prompt takes an admission slot: a batch larger than the server admits at once could never run
    limit = min(MAX_PROMPTS, ctx.admission.capacity)
    if len(batch) > limit:
        raise invalid(f"At most {limit} prompts per request on this server (max_num_seqs + max_queue, capped at "
                      f"{MAX_PROMPTS}); this one has {len(batch)}.", "prompt")
    tok = ctx.engine.tokenizer
    vocab = getattr(tok, "vocab_size", None)
    out = []
    for i, item in enumerate(batch):
        where = f"prompt[{i}]: " if len(batch) > 1 else ""
        if isinstance(item, str):
            out.append((tok.encode(item, add_special_tokens=True), item))
            continue
        if vocab is not None and any(not 0 <= t < vocab for t in item):
            raise invalid(f"{where}Token ids must be in [0, {vocab}).", "prompt")
        out.append((list(item), tok.decode(list(item))))
    return out


def _check_lengths(ctx: ServerContext, prompts: list[tuple[list[int], str]], max_tokens: int | None) -> None:
    """Raises the 400 of the first prompt the model cannot take, naming which one in a batch."""
    for i, (ids, _) in enumerate(prompts):
        try:
            check_context(ctx, len(ids), max_tokens, "prompt")
        except APIError as e:
            if len(prompts) > 1:
                e.message = f"prompt[{i}]: {e.message}"
            raise


async def _screen(ctx: ServerContext, prompts, request_id: str, key_name: str) -> list[Answer | None]:
    """Returns per prompt None (generate) or the Answer of its choices (held for review, or blocked)."""
    g = ctx.guarding
    if g is None:
        return [None] * len(prompts)
    answers, blocked = [], None
    for _, text in prompts:
        try:
            answers.append(await g.check_prompt(text, request_id, key_name, markers=ctx.special_tokens))
        except APIError as e:
            if e.code != "content_filter":
                raise
            blocked = blocked or e
            answers.append(Answer("", "content_filter", servelm={"content_filter": {"reason": e.message}}))
    if blocked is not None and all(a is not None and "review_id" not in a.servelm for a in answers):
        raise blocked  # nothing of the request may run
    return answers


@router.post("/v1/completions", response_model=Completion,
             summary="Create a text completion (set stream=true for server-sent events)")
async def create_completion(body: CompletionRequest, request: Request,
                            principal: Principal = Depends(require("chat"))):
    """Returns a Completion, or an SSE stream of Completion chunks ending with ``data: [DONE]``."""
    ctx = get_context(request)
    ctx.check_model(body.model)
    if body.suffix:
        raise invalid("suffix is not supported by this model.", "suffix", "unsupported_parameter")
    if body.best_of is not None and body.best_of != body.n:
        raise invalid("best_of is not supported; use n (every choice is returned).", "best_of",
                      "unsupported_parameter")
    # max_tokens=0 with echo scores the prompt (lm-evaluation-harness's loglikelihood requests): the
    # engine generates one token, which the answer leaves out.
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise invalid("max_tokens must be at least 1 (0 is only for scoring the prompt, with echo=true).",
                      "max_tokens")
    if score_only and body.stream:
        raise invalid("max_tokens=0 (scoring the prompt) is not supported with stream=true.", "max_tokens")
    spec, spec_param, _ = structured.from_request(body)
    if spec is not None and score_only:
        raise invalid("max_tokens=0 (scoring the prompt) generates nothing to constrain.", spec_param)
    await structured.check(ctx.engine, spec, spec_param)
    prompts = _prompts(ctx, body)
    info = request.scope["servelm"]
    if ctx.settings.log_prompts:
        info["prompt"] = prompts[0][1] if len(prompts) == 1 else [text for _, text in prompts]
    prompt_lp = body.logprobs if body.echo else None  # echo + logprobs: the prompt's tokens are scored too
    params = sampling_params(body, 1 if score_only else body.max_tokens, body.logprobs,
                             getattr(ctx.engine.tokenizer, "vocab_size", None), prompt_logprobs=prompt_lp,
                             structured_output=spec)
    # a prompt the model cannot take gets its precise 400 before any scanning
    _check_lengths(ctx, prompts, params.max_tokens)
    rid_req, rid = info["request_id"], "cmpl-" + uuid.uuid4().hex
    answers = await _screen(ctx, prompts, rid_req, principal.name)
    run = [i for i, a in enumerate(answers) if a is None]
    echo = [text if body.echo else "" for _, text in prompts]
    headers = _review_header(answers)

    async def run_stream() -> list[Generation]:
        return await start_batch(ctx, request, principal, [prompts[i][0] for i in run], params)

    async def run_collect():
        gens = await run_stream()
        try:
            return gens, await until_disconnect(request, gather_all(
                [_collect(ctx, gen, body, echo[i], score_only) for gen, i in zip(gens, run)]))
        finally:
            await finish_all(gens)  # a generation whose collector never ran (client gone) is released too

    note = next((a.servelm for a in answers if a is not None and "review_id" in a.servelm), None)
    result = (await call_engine(ctx.guarding, rid_req, run_stream if body.stream else run_collect)) if run else []
    if isinstance(result, FallbackResult):
        info["fallback"] = result.kind
        answers = [Answer(result.text, "stop")] * len(prompts)
        note, headers = {"fallback": {"kind": result.kind, "reason": result.reason}}, fallback_headers(result)
        run, result = [], []
    if body.stream:
        gens = result
        headers |= gens[0].rate_headers if gens else {}
        return sse.EventStream(headers=headers, content=_stream(ctx, gens, run, answers, body, rid,
                                                                 [text for _, text in prompts], note,
                                                                 principal.name, rid_req))
    gens, collected = result if result else ([], [])
    headers |= gens[0].rate_headers if gens else {}
    choices = _fixed_choices(answers, body.n, echo)
    for gen, i, cs in zip(gens, run, collected):
        for c in cs:
            await _scan(ctx, c, echo[i], rid_req, principal.name, prompts[i][1])
            c.index += i * body.n
        choices += cs
    used = usage(gens)
    if score_only:  # the one generated token is not part of the answer
        used.completion_tokens, used.total_tokens = 0, used.prompt_tokens
    out = Completion(id=rid, model=ctx.model_name, servelm=note, usage=used,
                     choices=sorted(choices, key=lambda c: c.index))
    return JSONResponse(out.model_dump(mode="json"), headers=headers)


def _review_header(answers: list[Answer | None]) -> dict:
    review = next((a.servelm["review_id"] for a in answers if a is not None and "review_id" in a.servelm), None)
    return {"x-servelm-review-id": review} if review else {}


def _fixed_choices(answers: list[Answer | None], n: int, echo: list[str]) -> list[CompletionChoice]:
    """Returns the choices of the prompts the engine does not answer (held, blocked, or a fallback)."""
    return [CompletionChoice(index=i * n + j, text=echo[i] + a.text, finish_reason=a.finish_reason,
                             servelm=a.servelm or None)
            for i, a in enumerate(answers) if a is not None for j in range(n)]


async def _scan(ctx: ServerContext, c: CompletionChoice, echo: str, request_id: str, key_name: str,
                prompt: str) -> None:
    """Passes one collected choice through the output guard."""
    if ctx.guarding is None:
        return
    raw = c.text[len(echo):]
    a = await ctx.guarding.scan_output(raw, request_id, key_name, prompt)
    if a.hides(raw):
        c.logprobs = None
    c.text, c.servelm = echo + a.text, a.servelm or None
    c.finish_reason = a.finish_reason or c.finish_reason


async def _collect(ctx: ServerContext, gen: Generation, body: CompletionRequest, echo: str,
                   score_only: bool = False) -> list[CompletionChoice]:
    last = await gen.final()
    head = _echo_logprobs(ctx, gen, last, body)  # echo: the prompt's tokens come first in every choice's logprobs
    prompt_lps = None
    if body.prompt_logprobs is not None and last.prompt_logprobs is not None:
        prompt_lps = vllm_prompt_logprobs(last.prompt_logprobs, body.prompt_logprobs)
    choices = []
    for c in sorted(last.outputs, key=lambda c: c.index):
        lp = None
        if body.logprobs is not None:
            lp = completion_logprobs([] if score_only else c.logprobs or [], body.logprobs, TextOffsets(len(echo)),
                                     into=head.model_copy(deep=True) if head is not None else None)
        text = echo if score_only else echo + c.text
        reason = "length" if score_only else client_finish_reason(c.finish_reason)
        choices.append(CompletionChoice(index=c.index, text=text, logprobs=lp, finish_reason=reason,
                                        prompt_logprobs=prompt_lps))
    return choices


def _echo_logprobs(ctx: ServerContext, gen: Generation, out, body: CompletionRequest):
    """Returns the logprobs of the echoed prompt's tokens (None unless echo and logprobs were asked).

    ``out`` is any engine output after the prefill: the engine sends none before the first token is
    sampled, by which time every prompt token is scored."""
    if body.logprobs is None or not body.echo or out is None or out.prompt_logprobs is None:
        return None
    return prompt_completion_logprobs(gen.prompt_ids, out.prompt_logprobs, body.logprobs, ctx.engine.tokenizer)


def _stream(ctx: ServerContext, gens: list[Generation], run: list[int], answers: list[Answer | None],
            body: CompletionRequest, rid: str, texts: list[str], note: dict | None, key_name: str, request_id: str):
    created = int(time.time())
    n = body.n
    echo = [text if body.echo else "" for text in texts]

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices, usage=None, **extra) -> bytes:
        if include_usage:  # null on every chunk but the last, as OpenAI sends it
            extra["usage"] = usage
        return sse.event(Completion(id=rid, created=created, model=ctx.model_name, choices=choices, **extra))

    # the engine's generation k answers prompt run[k]: its choice index k * n + j is sent as run[k] * n + j
    prompt_of = {k * n + j: (i, j) for k, i in enumerate(run) for j in range(n)}
    g = ctx.guarding
    scanners = {k: g.stream_scanner(request_id, key_name, texts[i]) if g is not None and g.guard is not None
                else None for k, (i, _) in prompt_of.items()}
    offsets = {k: TextOffsets(len(echo[i])) for k, (i, _) in prompt_of.items()}

    async def step(k, c):
        i, j = prompt_of[k]
        lp, ended = None, False
        text, servelm = c.delta_text, None
        reason = client_finish_reason(c.finish_reason)
        scanner = scanners[k]
        if scanner is not None:
            text = await run_stream_stages([scanner], text, c.finished)
            if scanner.finish_reason:  # a guard ended this choice
                ended, reason, servelm = True, scanner.finish_reason, scanner.servelm
            elif c.finished:  # the last chunk says what the guard changed
                servelm = scanner.servelm
        elif body.logprobs is not None and c.delta_logprobs:
            # logprobs only unguarded: a guard holds text back, so token offsets would not match
            lp = completion_logprobs(c.delta_logprobs, body.logprobs, offsets[k])
        if not text and lp is None and reason is None:
            return None, ended  # a guard is holding this text back: no empty chunk
        return CompletionChoice(index=i * n + j, text=text, logprobs=lp, finish_reason=reason,
                                servelm=servelm), ended

    # echo: each choice's first chunk is its prompt, with the prompt's logprobs when asked (as non-streamed:
    # the first token's is null). The prompt is the client's own text, so a guard does not hold these back.
    prompt_lps = [_echo_logprobs(ctx, gen, gen.first, body) if echo[i] else None for gen, i in zip(gens, run)]
    head = [CompletionChoice(index=i * n + j, text=echo[i], logprobs=lp)
            for lp, i in zip(prompt_lps, run) for j in range(n) if echo[i]]
    head += _fixed_choices(answers, n, echo)
    events = [chunk([c], servelm=note if k == 0 else None) for k, c in enumerate(head)]
    if note and not head:
        events.append(chunk([], servelm=note))
    return stream_events(gens, n, step, chunk, include_usage, events)
