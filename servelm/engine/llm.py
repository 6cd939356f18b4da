"""Offline batch inference, shaped like ``vllm.LLM``."""
from __future__ import annotations

import itertools
import logging
from dataclasses import fields

from tqdm import tqdm

from servelm.engine.config import EngineConfig
from servelm.engine.llm_engine import LLMEngine
from servelm.engine.outputs import RequestOutput
from servelm.engine.sampling_params import InvalidRequestError, SamplingParams

log = logging.getLogger("servelm.engine")

# vLLM options that change nothing servelm does, accepted (with a warning) so vLLM scripts run unchanged.
# The value is the one setting servelm honours (None: any value); another value raises ValueError.
_VLLM_OPTIONS: dict[str, object] = {
    "trust_remote_code": None,  # servelm runs no code from model repositories
    "enable_chunked_prefill": None,  # servelm always splits long prompts over steps (max_num_batched_tokens)
    "kv_cache_dtype": "auto",  # the KV cache is in the model's dtype
    "tokenizer_mode": "auto",  # the fast tokenizer
    "swap_space": None,  # preemption recomputes, it never swaps to host memory
    "disable_log_stats": None,
    "max_logprobs": None,  # checked below: servelm returns at most 20
}


class LLM:
    """``LLM(model=None, dtype="auto", quantization=None, **engine_options).generate(prompts, params)``.

    ``model=None`` loads the embedded SmolLM2; a path or a Hugging Face repo id (``"org/name"``) loads that.
    Any :class:`EngineConfig` field is accepted as a keyword, and so are vLLM's options that do not change
    the results (``trust_remote_code``, ``swap_space``, ...; logged and ignored).
    Raises TypeError for an unknown option and ValueError for a vLLM option value servelm cannot honour.
    """

    def __init__(self, model: str | None = None, **kwargs):
        names = {f.name for f in fields(EngineConfig)}
        for name in [k for k in kwargs if k not in names and k in _VLLM_OPTIONS]:
            value, wanted = kwargs.pop(name), _VLLM_OPTIONS[name]
            if wanted is not None and value != wanted:
                raise ValueError(f"{name}={value!r} is not supported; servelm uses {name}={wanted!r}")
            if name == "max_logprobs" and value is not None and not 0 <= value <= 20:
                raise ValueError(f"max_logprobs={value} is not supported; servelm returns at most 20 logprobs")
            log.warning("LLM(%s=%r): accepted for vLLM compatibility; it changes nothing in servelm", name, value)
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown LLM options: {', '.join(sorted(unknown))}")
        if "tokenizer" in kwargs and kwargs["tokenizer"] == model:  # vLLM scripts often repeat the model here
            del kwargs["tokenizer"]
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """Wrap an existing engine (e.g. one sharing already-loaded weights)."""
        self = cls.__new__(cls)
        self.engine = engine
        self._ids = itertools.count()
        return self

    @property
    def tokenizer(self):
        """servelm's :class:`~servelm.engine.tokenizer.Tokenizer` (``get_tokenizer()`` gives the HF one)."""
        return self.engine.tokenizer

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's name for the engine."""
        return self.engine

    def get_tokenizer(self):
        """The model's Hugging Face tokenizer, as vLLM's ``LLM.get_tokenizer()`` returns it."""
        return self.engine.tokenizer.hf

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; returns outputs in the order of ``prompts``.

        A prompt is a text, a list of token ids, or vLLM's ``{"prompt": text}`` / ``{"prompt_token_ids": ids}``;
        ``prompts`` is one prompt or a list of them.
        Raises :class:`InvalidRequestError` (before running anything) if any prompt is invalid.
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([(p, None) for p in prompts], sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Render each conversation with the chat template and generate its reply, as vLLM's ``LLM.chat``.

        ``messages`` is one conversation (a list of ``{"role", "content"}``) or a list of them; content may be
        a string or OpenAI content parts, of which text parts are joined. Returns one output per conversation.
        Raises :class:`InvalidRequestError` for a non-text part or messages the template cannot render.
        """
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.engine.tokenizer
        kwargs = dict(chat_template_kwargs or {})
        kwargs.update(continue_final_message=continue_final_message)
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        if tools is not None:
            kwargs["tools"] = tools
        prompts = []
        for i, conv in enumerate(convs):
            try:
                text = tok.apply_chat_template([_text_message(m, i, j) for j, m in enumerate(conv)],
                                               add_generation_prompt=add_generation_prompt, **kwargs)
            except InvalidRequestError:
                raise
            except Exception as e:  # the template rejects e.g. a role order, or no template at all
                raise InvalidRequestError(f"conversation {i} cannot be rendered by the chat template: {e}",
                                          "messages") from e
            # the template writes the special tokens itself, so none are added (as the server does)
            prompts.append((text, tok.encode(text, add_special_tokens=False)))
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[tuple[object, list[int] | None]],
             sampling_params: SamplingParams | list[SamplingParams] | None, use_tqdm: bool) -> list[RequestOutput]:
        """Queue (prompt, token ids or None) pairs, step until all finish; returns outputs in order."""
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("pass one SamplingParams or one per prompt")
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for rid, (prompt, prompt_ids), p in zip(ids, prompts, plist):
                if prompt_ids is not None and p.truncate_prompt_tokens is not None:
                    _, prompt_ids = self.engine.tokenize_prompt(prompt_ids, p)
                self.engine.add_request(rid, prompt, p, prompt_ids=prompt_ids)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[r] for r in ids]


def _text_message(m: dict, conv: int, idx: int) -> dict:
    """``m`` with OpenAI content parts joined into one string (the model reads text only).

    Raises :class:`InvalidRequestError` naming a part that is not text."""
    content = m.get("content") if isinstance(m, dict) else None
    if not isinstance(content, list):
        return m
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequestError(f"conversation {conv}, message {idx} has a {kind!r} content part; this model "
                                      "reads text parts only.", "messages")
        texts.append(part["text"])
    return {**m, "content": "".join(texts)}
