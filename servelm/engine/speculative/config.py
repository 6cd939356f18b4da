"""``speculative_config`` in vLLM's shape: ``{"method": "ngram", "num_speculative_tokens": 4, ...}``."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model")


@dataclass(slots=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    model: str | None = None  # draft_model: the draft (a path, a repo id or dummy:<shape>) of the target's vocabulary
    prompt_lookup_max: int = 4  # the longest suffix n-gram looked up (ngram)
    prompt_lookup_min: int = 1  # the shortest (ngram)
    # Speculation stops while more sequences than this run (vLLM's name): a batch this large already fills
    # the machine, and verifying rejected proposals would only cost compute (see docs/speculative.md).
    disable_by_batch_size: int = 4

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """The config of a dict, its JSON text, or an instance; None for None.

        Raises ValueError naming the bad key or value (an unknown method, a key vLLM's config has but this
        engine does not run, a number out of range)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON ({e.msg}); give e.g. "
                                 '\'{"method": "ngram", "num_speculative_tokens": 4}\'') from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object such as "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"speculative_config key {unknown[0]!r} is not supported; known keys: "
                             f"{', '.join(sorted(names))}")
        if "model" in value and "method" not in value:  # as vLLM: a config naming a model drafts with it
            value = {**value, "method": "draft_model"}
        cfg = cls(**value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises ValueError for an unknown method or a value out of range."""
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method {self.method!r} is not supported; choose one of "
                             f"{', '.join(METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config {name} must be an integer >= 1, got {v!r}")
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model):
            raise ValueError('speculative_config method "draft_model" needs "model": the draft model\'s path '
                             "(a smaller model with the target's tokenizer)")
        if self.method == "ngram" and self.model is not None:
            raise ValueError('speculative_config method "ngram" takes no "model"; drop it, or use '
                             '"method": "draft_model"')
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
