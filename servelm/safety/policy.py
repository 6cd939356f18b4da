"""Guard policy: per scanner a threshold and an action, per deployment, overridable per API key.

Example YAML (every key optional; defaults below)::

    max_input_chars: auto        # characters per scanned text; auto: 32000, or under `servelm serve`
                                 # 8 per token of the served context window (whichever is larger)
    fail_mode: closed            # default when a scanner raises: closed = block, open = allow
    held_response: review_id     # what a client gets when sent to review: review_id | message
    held_message: "Your request is being reviewed."
    canary: "c4n4ry-7f3a"        # secret token placed in the system prompt; seeing it in output = leak
    scanners:
      prompt_injection: {threshold: 0.5, action: block}
      pii:              {threshold: 0.4, action: redact, entities: [EMAIL_ADDRESS, CREDIT_CARD]}
      harmful_output:   {action: review}
    api_keys:
      sk-internal-team:          # a key's overrides are merged over the deployment's
        scanners: {pii: {action: allow}}
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from servelm.safety.pii import KNOWN_ENTITIES

ACTIONS = ("allow", "redact", "block", "review")
FAIL_MODES = ("open", "closed")


class PolicyError(ValueError):
    """The policy file or an override is invalid; the message names the key to fix."""


@dataclass(slots=True)
class ScannerPolicy:
    """How one scanner's finding is handled. ``threshold`` is on the scanner's 0..1 score."""

    enabled: bool = True
    threshold: float = 0.5
    action: str = "block"
    fail_mode: str | None = None  # None = the policy's default
    entities: list[str] | None = None  # PII only: which entity types


DEFAULT_SCANNERS: dict[str, ScannerPolicy] = {
    "length": ScannerPolicy(threshold=1.0, action="block"),
    "injection_rules": ScannerPolicy(threshold=1.0, action="block"),
    "prompt_injection": ScannerPolicy(threshold=0.0, action="block"),  # 0.0 = the model's own threshold
    "secrets": ScannerPolicy(threshold=1.0, action="block"),
    "harmful_input": ScannerPolicy(enabled=False, threshold=0.0, action="review"),
    "pii": ScannerPolicy(threshold=0.4, action="redact"),
    # Opt-in: the n-gram harm model is trained on harmful *requests*; on free-form model
    # output its false-positive rate is too high to act on by default (docs/safety.md).
    "harmful_output": ScannerPolicy(enabled=False, threshold=0.0, action="review"),
    "system_prompt_leak": ScannerPolicy(threshold=0.5, action="block"),  # canary = 1.0; echo = share
}


@dataclass(slots=True)
class Policy:
    """A deployment's guard policy; :meth:`for_api_key` returns a key's effective policy."""

    scanners: dict[str, ScannerPolicy] = field(default_factory=lambda: copy.deepcopy(DEFAULT_SCANNERS))
    max_input_chars: int | None = None  # None ("auto" in YAML): the guard's default_max_input_chars
    fail_mode: str = "closed"
    held_response: str = "review_id"
    held_message: str = "This response is held for human review."
    canary: str = ""
    api_keys: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Policy":
        """Return a validated policy from a parsed YAML mapping; raises :class:`PolicyError`."""
        return cls().merged(data or {}, where="policy")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Policy":
        """Return the policy in the YAML file at ``path``; raises :class:`PolicyError`."""
        p = Path(path)
        if not p.is_file():
            raise PolicyError(f"policy file {p} not found")
        return cls.from_yaml_text(p.read_text(encoding="utf-8"))

    @classmethod
    def from_yaml_text(cls, text: str) -> "Policy":
        """Return the policy in YAML ``text``; raises :class:`PolicyError`."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PolicyError(f"policy is not valid YAML: {e}") from e
        if data is not None and not isinstance(data, dict):
            raise PolicyError("policy must be a YAML mapping (got a scalar or list)")
        return cls.from_dict(data)

    def merged(self, overrides: dict, where: str = "overrides") -> "Policy":
        """Return a copy with ``overrides`` (same shape as the YAML) applied; raises PolicyError."""
        if not isinstance(overrides, dict):
            raise PolicyError(f"{where} must be a mapping")
        new = replace(self, scanners=copy.deepcopy(self.scanners), api_keys=dict(self.api_keys))
        known = {f.name for f in fields(Policy)}
        for key, value in overrides.items():
            if key not in known:
                raise PolicyError(f"{where}.{key}: unknown key; known: {', '.join(sorted(known))}")
            if key == "scanners":
                if not isinstance(value, dict):
                    raise PolicyError(f"{where}.scanners must be a mapping of scanner name to settings")
                for name, conf in value.items():
                    new.scanners[name] = _merge_scanner(new.scanners.get(name, ScannerPolicy()), conf,
                                                        f"{where}.scanners.{name}")
            elif key == "api_keys":
                if not isinstance(value, dict):
                    raise PolicyError(f"{where}.api_keys must map API keys to overrides")
                new.api_keys.update(value)
            elif key == "max_input_chars" and value in ("auto", None):
                new.max_input_chars = None
            else:
                setattr(new, key, value)
        if new.fail_mode not in FAIL_MODES:
            raise PolicyError(f"{where}.fail_mode must be one of {FAIL_MODES}, got {new.fail_mode!r}")
        if new.held_response not in ("review_id", "message"):
            raise PolicyError(f"{where}.held_response must be 'review_id' or 'message'")
        if new.max_input_chars is not None and (not isinstance(new.max_input_chars, int)
                                                or isinstance(new.max_input_chars, bool) or new.max_input_chars <= 0):
            raise PolicyError(f"{where}.max_input_chars must be a positive integer or auto")
        return new

    def for_api_key(self, api_key: str | None) -> "Policy":
        """Return the effective policy for ``api_key`` (the deployment's if it has no overrides)."""
        if api_key and api_key in self.api_keys:
            return self.merged(self.api_keys[api_key], where=f"api_keys.{api_key[:6]}…")
        return self

    def scanner(self, name: str) -> ScannerPolicy:
        """Return the policy for scanner ``name`` (defaults if unlisted)."""
        return self.scanners.get(name) or ScannerPolicy()

    def fail_mode_for(self, name: str) -> str:
        """Return ``open`` or ``closed`` for scanner ``name``."""
        return self.scanner(name).fail_mode or self.fail_mode


def _merge_scanner(base: ScannerPolicy, conf, where: str) -> ScannerPolicy:
    if not isinstance(conf, dict):
        raise PolicyError(f"{where} must be a mapping (threshold, action, enabled, fail_mode, entities)")
    out = replace(base)
    allowed = {f.name for f in fields(ScannerPolicy)}
    for k, v in conf.items():
        if k not in allowed:
            raise PolicyError(f"{where}.{k}: unknown setting; known: {', '.join(sorted(allowed))}")
        setattr(out, k, v)
    if out.action not in ACTIONS:
        raise PolicyError(f"{where}.action must be one of {ACTIONS}, got {out.action!r}")
    if out.fail_mode is not None and out.fail_mode not in FAIL_MODES:
        raise PolicyError(f"{where}.fail_mode must be one of {FAIL_MODES}")
    if out.entities is not None and (not isinstance(out.entities, list)
                                     or any(e not in KNOWN_ENTITIES for e in out.entities)):
        raise PolicyError(f"{where}.entities must be a list of {', '.join(KNOWN_ENTITIES)}; got {out.entities!r}")
    try:
        out.threshold = float(out.threshold)
    except (TypeError, ValueError):
        raise PolicyError(f"{where}.threshold must be a number in [0, 1]") from None
    if not 0.0 <= out.threshold <= 1.0:
        raise PolicyError(f"{where}.threshold must be in [0, 1], got {out.threshold}")
    return out
