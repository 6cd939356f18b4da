"""POST /v1/chat/completions: OpenAI chat, streaming and not, with the request pipeline around it."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from servelm.prompts.tools import tool_turns_as_text, with_tools
from servelm.server import sse, structured, tool_parser
from servelm.server.auth import Principal, require
from servelm.server.context import ServerContext, get_context
from servelm.server.errors import invalid
from servelm.server.logprobs import chat_logprobs, vllm_prompt_logprobs
from servelm.serving.pipeline import Answer, ChatTurn, run_stream_stages
from servelm.server.schemas import (AssistantMessage, ChatChoice, ChatMessage, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, ChatCompletionRequest, DeltaMessage, Tool, Usage)
from servelm.safety import FallbackResult
from servelm.serving.guard import call_engine, fallback_headers
from servelm.server.serving import Generation, client_finish_reason, sampling_params, start, until_disconnect
from servelm.server.streaming import stream_events, usage

router = APIRouter(tags=["openai"])

_ROLE = {"developer": "system"}  # chat templates know system/user/assistant/tool


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             summary="Create a chat completion (set stream=true for server-sent events)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request, response: Response,
                                 principal: Principal = Depends(require("chat"))):
    """Returns a ChatCompletion, or an SSE stream of ChatCompletionChunk ending with ``data: [DONE]``."""
    ctx = get_context(request)
    ctx.check_model(body.model)
    given = _given_tools(body)
    tools = _tools(body, given)
    spec, spec_param, forced = structured.from_request(body, given)
    auto = tool_parser.for_request(body, tools) if forced is None else None
    await structured.check(ctx.engine, spec, spec_param)
    info = request.scope["servelm"]
    turn = ChatTurn(messages=turn_messages(body.messages), strategy=body.strategy, rag=body.rag,
                    key_name=principal.name, request_id=info["request_id"])
    turn.metadata.update(include_reasoning=body.include_reasoning,
                         examples=[e.model_dump() for e in body.examples or []])
    await ctx.pipeline.before(turn)
    if "reply" in turn.metadata:  # a pre-stage answered itself (e.g. RAG found nothing relevant)
        return _reply(ctx, turn, body)
    if ctx.settings.log_prompts:
        info["prompt"] = turn.messages
    rid = "chatcmpl-" + uuid.uuid4().hex
    if turn.held is not None:  # held for human review: the model is not called
        info["finish_reason"] = "content_filter"
        review = {"x-servelm-review-id": turn.held.servelm["review_id"]} if turn.held.servelm.get("review_id") else {}
        return _answer_without_engine(ctx, rid, body, turn.held.text, "content_filter", turn.held.servelm, review)
    tok = ctx.engine.tokenizer
    prompt_ids = tok.encode(render_prompt(tok, turn.messages, tools, forced=forced is not None,
                                          add_generation_prompt=body.add_generation_prompt,
                                          continue_final_message=body.continue_final_message,
                                          template_kwargs=body.chat_template_kwargs), add_special_tokens=False)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs requires logprobs=true.", "top_logprobs")
    k = body.top_logprobs or 0
    params = sampling_params(body, body.max_completion_tokens or body.max_tokens, k if body.logprobs else None,
                             getattr(tok, "vocab_size", None), structured_output=spec)

    async def run_stream():
        return await start(ctx, request, principal, prompt_ids, params, prompt_param="messages")

    async def run_collect():
        gen = await run_stream()
        response.headers.update(gen.rate_headers)
        return gen, await until_disconnect(request, _collect(gen, k))

    if body.stream:
        gen = await call_engine(ctx.guarding, turn.request_id, run_stream)
        if isinstance(gen, FallbackResult):
            return _fallback(ctx, rid, body, gen, info)
        response.headers.update(gen.rate_headers)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.EventStream(headers=gen.rate_headers,
                               content=_stream(ctx, gen, turn, body, rid, k, include_usage, forced, auto))
    result = await call_engine(ctx.guarding, turn.request_id, run_collect)
    if isinstance(result, FallbackResult):
        return _fallback(ctx, rid, body, result, info)
    gen, (raw, prompt_lps) = result
    choices = []
    for index, c_text, reason, logprobs in raw:
        a = await ctx.pipeline.answer(turn, c_text)
        if structured.is_json(spec) and not a.finish_reason and not structured.still_json(c_text, a.text):
            a = _broken_json()
        if a.hides(c_text):
            logprobs = None
        message = AssistantMessage(content=a.text, **a.extras)
        calls = forced.calls(a.text) if forced is not None and not a.finish_reason else None
        if calls:
            reason = "function_call" if forced.legacy else "tool_calls"
            message = (AssistantMessage(function_call=calls[0]["function"]) if forced.legacy
                       else AssistantMessage(tool_calls=calls))
        elif auto is not None and not a.finish_reason:
            content, calls = auto.parse(a.text)
            if calls:
                reason = "function_call" if auto.legacy else "tool_calls"
                message = AssistantMessage(content=content, **tool_parser.message_fields(auto, calls), **a.extras)
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs,
                                  finish_reason=a.finish_reason or reason, servelm=a.servelm or None))
    note = next((c.servelm for c in choices if c.servelm and "review_id" in c.servelm), None)
    if note:
        response.headers["x-servelm-review-id"] = note["review_id"]
    out = ChatCompletion(id=rid, model=ctx.model_name, choices=choices, servelm=note,
                         usage=usage([gen]), sources=turn.metadata.get("sources"),
                         prompt_logprobs=vllm_prompt_logprobs(prompt_lps, body.prompt_logprobs)
                         if body.prompt_logprobs is not None and prompt_lps is not None else None)
    return out


def _broken_json() -> Answer:
    """The answer when the output guard's redaction left a JSON answer unparseable (see docs/server.md)."""
    return Answer("", "content_filter", servelm={"content_filter": {
        "scanner": "structured_output", "reason": "the output guard redacted part of the JSON answer where JSON "
                                                  "has no string, so it is withheld"}})


def turn_messages(messages: list[ChatMessage]) -> list[dict]:
    """Returns the request's messages as ``{"role", "content"}`` dicts in chat-template roles (with ``name``,
    ``tool_calls`` and ``tool_call_id`` where given). The legacy function protocol is read as tools, as vLLM
    does: an assistant ``function_call`` is a one-call ``tool_calls``, a ``function`` message the tool result
    answering it.

    Raises APIError(400) for a user/system message without content or a non-text content part."""
    for i, m in enumerate(messages):
        if m.content is None and m.role in ("user", "system", "developer"):
            raise invalid(f"messages[{i}].content is required for a '{m.role}' message.", f"messages.{i}.content")
        readable = ("text", "refusal") if m.role == "assistant" else ("text",)  # a refusal replays as text
        for j, part in enumerate(m.content if isinstance(m.content, list) else ()):
            if part.type not in readable:
                raise invalid(f"messages[{i}].content has a '{part.type}' part; this model reads text parts only.",
                              f"messages.{i}.content", "unsupported_content")
            if getattr(part, part.type) is None:
                raise invalid(f"Missing required parameter: 'messages[{i}].content[{j}].{part.type}'.",
                              f"messages.{i}.content.{j}.{part.type}", "missing_required_parameter")
    out, call_ids = [], {}  # legacy calls by function name, so that a function message answers its call
    for i, m in enumerate(messages):
        d = {"role": _ROLE.get(m.role, m.role), "content": m.text()}
        d.update((k, v) for k in ("name", "tool_calls", "tool_call_id") if (v := getattr(m, k)) is not None)
        if m.function_call is not None and not m.tool_calls:
            call_ids[m.function_call.get("name")] = cid = f"call_{i}"
            d["tool_calls"] = [{"id": cid, "type": "function", "function": m.function_call}]
        if m.role == "function":
            d["role"] = "tool"
            if m.name in call_ids:
                d["tool_call_id"] = call_ids.pop(m.name)
        out.append(d)
    return out


def _tools(body: ChatCompletionRequest, tools: list[dict]) -> list[dict] | None:
    """Returns the request's ``tools`` for the chat template (None with tool_choice "none"); raises
    APIError(400) for audio output. A forced call (tool_choice "required" or named) is enforced by
    :mod:`structured`."""
    if body.modalities and "audio" in body.modalities:
        raise invalid("Audio output is not supported; this model writes text.", "modalities", "unsupported_parameter")
    if not tools or "none" in (body.tool_choice, body.function_call):
        return None
    return tools


def _given_tools(body: ChatCompletionRequest) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in body.tools or [Tool(function=f) for f in body.functions or []]]


def render_prompt(tok, messages: list[dict], tools: list[dict] | None = None, forced: bool = False,
                  add_generation_prompt: bool = True, continue_final_message: bool = False,
                  template_kwargs: dict | None = None) -> str:
    """Returns ``messages`` rendered by the model's chat template, ready for the assistant's turn (vLLM's
    ``add_generation_prompt``), or ending inside the last assistant message, which the model then continues
    (``continue_final_message``: the template's text is cut where that message's content ends, as
    transformers and vLLM do). ``template_kwargs`` are extra template variables (vLLM's ``chat_template_kwargs``).

    ``tools`` go to a template that renders them (mentions ``tools``). For one that does not, they are
    described in the system message with the call format ``server/tool_parser.py`` reads back (only the
    functions when ``forced``: constrained decoding fixes the form), and earlier tool calls and results
    are written out as text (``prompts/tools.py``). Raises APIError(400) when the template cannot render them."""
    if continue_final_message and (add_generation_prompt or messages[-1]["role"] != "assistant"):
        raise invalid("continue_final_message continues the last message, which must be an assistant message, "
                      "and needs add_generation_prompt false.", "continue_final_message")
    kwargs = dict(template_kwargs or {})
    if getattr(tok, "renders_tools", False):
        kwargs |= {"tools": tools} if tools else {}
    elif tools:
        messages = with_tools(messages, tools, forced)
    elif any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        messages = tool_turns_as_text(messages)
    if continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # the model's template rejects e.g. a role order it cannot render
        raise invalid(f"The messages cannot be rendered by this model's chat template: {e}", "messages") from None


def _reply(ctx: ServerContext, turn: ChatTurn, body: ChatCompletionRequest):
    """Returns the pre-stage's ``metadata["reply"]`` as the answer of every choice, without generating."""
    rid = "chatcmpl-" + uuid.uuid4().hex
    text, sources = turn.metadata["reply"], turn.metadata.get("sources")
    if not body.stream:
        return ChatCompletion(id=rid, model=ctx.model_name, sources=sources,
                              choices=[ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason="stop")
                                       for i in range(body.n)],
                              usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        def chunk(choices, **extra) -> bytes:
            if include_usage:
                extra.setdefault("usage", None)
            return sse.event(ChatCompletionChunk(id=rid, created=int(time.time()), model=ctx.model_name,
                                                 choices=choices, **extra))
        for i in range(body.n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=text), finish_reason="stop")])
        if sources is not None:
            yield chunk([], sources=sources)
        if include_usage:
            yield chunk([], usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0))
        yield sse.DONE

    return sse.EventStream(content=events())


def _answer_without_engine(ctx: ServerContext, rid: str, body: ChatCompletionRequest, text: str, reason: str,
                           note: dict, headers: dict | None = None):
    """Returns a one-choice answer the engine did not write (held for review, or a fallback)."""
    if body.stream:
        created = int(time.time())

        async def events():
            for choices in ([ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=text))],
                            [ChatChunkChoice(index=0, delta=DeltaMessage(), finish_reason=reason)]):
                yield sse.event(ChatCompletionChunk(id=rid, created=created, model=ctx.model_name, choices=choices,
                                                    servelm=note))
            yield sse.DONE

        return sse.EventStream(headers=headers or {}, content=events())
    out = ChatCompletion(id=rid, model=ctx.model_name, servelm=note, usage=Usage(prompt_tokens=0, total_tokens=0),
                         choices=[ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=reason)])
    return JSONResponse(out.model_dump(mode="json"), headers=headers or {})


def _fallback(ctx: ServerContext, rid: str, body: ChatCompletionRequest, r: FallbackResult, info: dict):
    info["fallback"] = r.kind
    return _answer_without_engine(ctx, rid, body, r.text, "stop", {"fallback": {"kind": r.kind, "reason": r.reason}},
                                  fallback_headers(r))


async def _collect(gen: Generation, k: int) -> tuple[list[tuple], list | None]:
    """Returns ``(index, text, finish_reason, logprobs)`` per choice as the engine wrote them, and the engine's
    prompt logprobs (None unless asked)."""
    last = await gen.final()
    logprobs_on = gen.params.logprobs is not None
    return [(c.index, c.text, client_finish_reason(c.finish_reason),
             chat_logprobs(c.logprobs or [], k) if logprobs_on else None)
            for c in sorted(last.outputs, key=lambda c: c.index)], last.prompt_logprobs


def _stream(ctx: ServerContext, gen: Generation, turn: ChatTurn, body: ChatCompletionRequest, rid: str,
            k: int, include_usage: bool, forced: structured.ForcedTools | None = None,
            auto: tool_parser.ToolCallParser | None = None):
    created = int(time.time())
    model = ctx.model_name

    def chunk(choices, usage=None, **extra) -> bytes:
        if include_usage:  # null on every chunk but the last, as OpenAI sends it
            extra["usage"] = usage
        return sse.event(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, **extra))

    stages = {i: ctx.pipeline.stream_stages(turn) for i in range(body.n)}
    calls = {}  # a forced call, or calls the model may write (tool_choice "auto")
    if forced is not None:
        calls = {i: structured.ToolCallStream(forced) for i in range(body.n)}
    elif auto is not None:
        calls = {i: tool_parser.AutoToolStream(auto) for i in range(body.n)}
    legacy = (forced or auto).legacy if calls else False

    async def step(index, c):
        delta, ended = c.delta_text, False
        reason, note = client_finish_reason(c.finish_reason), None
        if stages[index]:
            delta = await run_stream_stages(stages[index], delta, c.finished)
            stopped = next((s for s in stages[index] if getattr(s, "finish_reason", None)), None)
            if stopped is not None:  # a guard ended this choice: nothing more of it is sent
                ended, reason, note = True, stopped.finish_reason, getattr(stopped, "servelm", None)
            elif c.finished:  # the last chunk says what a guard changed
                note = next((s.servelm for s in stages[index] if getattr(s, "servelm", None)), None)
        # a stage that holds or rewrites text would have its tokens given away by logprobs
        lp = (chat_logprobs(c.delta_logprobs or [], k) if body.logprobs and c.delta_logprobs
              and all(getattr(s, "passthrough", False) for s in stages[index]) else None)
        fields = {"content": delta}
        if index in calls and not ended:
            fields, complete = calls[index].feed(delta, c.finished)
            if complete:
                reason = "function_call" if legacy else "tool_calls"
        if not any(fields.values()) and lp is None and reason is None:
            return None, ended  # a guard is holding this text back: no empty chunk
        return ChatChunkChoice(index=index, delta=DeltaMessage(**fields), logprobs=lp,
                               finish_reason=reason, servelm=note), ended

    def sources() -> list[bytes]:  # with 'rag': the cited chunks, once, after the answer
        found = turn.metadata.get("sources")
        return [chunk([], sources=found)] if found is not None else []

    head = [chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]) for i in range(body.n)]
    return stream_events([gen], body.n, step, chunk, include_usage, head, sources)
