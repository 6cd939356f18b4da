"""Offline batch inference, shaped like ``vllm.LLM``."""
from __future__ import annotations

import itertools
from dataclasses import fields

from tqdm import tqdm

from servelm.engine.config import EngineConfig
from servelm.engine.llm_engine import LLMEngine
from servelm.engine.outputs import RequestOutput
from servelm.engine.sampling_params import SamplingParams


class LLM:
    """``LLM(model=None, dtype="auto", quantization=None, **engine_options).generate(prompts, params)``.

    ``model=None`` loads the embedded SmolLM2; any :class:`EngineConfig` field is accepted
    as a keyword.
    """

    def __init__(self, model: str | None = None, **kwargs):
        names = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown LLM options: {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; returns outputs in the order of ``prompts``.

        Raises :class:`InvalidRequestError` (before running anything) if any prompt is invalid.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("pass one SamplingParams or one per prompt")
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, plist):
                self.engine.add_request(rid, prompt, p)
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

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Render ``messages`` with the model's chat template and generate one reply."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(prompt, sampling_params)[0]
