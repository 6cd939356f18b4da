"""Tokenizer and chat template, from GGUF metadata or a HF directory, through transformers.

transformers converts a GGUF vocabulary into a fast tokenizer, which takes seconds; the
converted tokenizer is cached on disk (keyed by the file's path, size and mtime).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from servelm.engine.models.config import ModelLoadError


def _byte_map(backend) -> str | None:
    """Returns how the vocabulary spells bytes, read from the tokenizer's decoder: "byte_level" (GPT-2
    byte-level BPE), "byte_fallback" (SentencePiece with <0xHH> tokens) or None (plain text tokens)."""
    if backend is None or backend.decoder is None:
        return None
    d = json.loads(backend.decoder.__getstate__())
    types = {d.get("type")} | {x.get("type") for x in d.get("decoders") or []}
    return "byte_level" if "ByteLevel" in types else "byte_fallback" if "ByteFallback" in types else None


@functools.cache
def _byte_level() -> dict[str, int]:
    """GPT-2's printable character per byte, inverted (transformers' table, as its tokenizer converter uses it)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def _cache_dir() -> Path:
    root = os.environ.get("SERVELM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "servelm")
    return Path(root) / "tokenizers"


class Tokenizer:
    """Thin wrapper over a transformers fast tokenizer with the calls the engine needs."""

    def __init__(self, hf_tokenizer, extra_eos_ids: list[int] | None = None):
        self.hf = hf_tokenizer
        eos = set(extra_eos_ids or [])
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids: set[int] = eos
        self.vocab_size = len(hf_tokenizer)
        self._backend = hf_tokenizer.backend_tokenizer if hasattr(hf_tokenizer, "backend_tokenizer") else None
        self._byte_map = _byte_map(self._backend)
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def from_source(cls, source: Path, extra_eos_ids: list[int] | None = None) -> "Tokenizer":
        """Load from a ``.gguf`` file or a HF directory; raises :class:`ModelLoadError`."""
        from transformers import AutoTokenizer

        try:
            if source.suffix == ".gguf":
                st = source.stat()
                key = hashlib.sha256(f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
                cached = _cache_dir() / key
                if (cached / "tokenizer.json").exists():
                    tok = AutoTokenizer.from_pretrained(str(cached))
                else:
                    tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
                    try:
                        tok.save_pretrained(str(cached))
                    except OSError:
                        pass  # a read-only home only costs the conversion next time
            else:
                tok = AutoTokenizer.from_pretrained(str(source))
        except Exception as e:  # transformers raises many error types for bad tokenizer files
            raise ModelLoadError(f"cannot load the tokenizer from {source}: {e}") from e
        return cls(tok, extra_eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the vocabulary (dummy models) are dropped."""
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if self._backend is not None:  # the backend call skips transformers' per-call overhead
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for, also when it is only part of a UTF-8 character (OpenAI's
        logprob ``bytes``): decoding the token alone would give U+FFFD instead. Cached per id."""
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = self._token_bytes(token_id)
        return b

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.hf.convert_ids_to_tokens(token_id) if 0 <= token_id < self.vocab_size else None
        if piece is not None and token_id not in self.hf.all_special_ids:
            if self._byte_map == "byte_level":  # GPT-2 style: each byte is spelled as one printable character
                try:
                    return bytes(_byte_level()[ch] for ch in piece)
                except KeyError:
                    pass  # an added token, spelled as plain text
            elif self._byte_map == "byte_fallback":  # SentencePiece: <0xHH> byte tokens, "▁" for a space
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    return bytes([int(piece[3:5], 16)])
                return piece.replace("\u2581", " ").encode("utf-8")
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def renders_tools(self) -> bool:
        """True when the chat template uses a ``tools`` variable (function definitions for the model)."""
        return "tools" in str(getattr(self.hf, "chat_template", None) or "")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs) -> str | list[int]:
        """Render ``messages`` with the model's own chat template (or ``chat_template=``): the text, or with
        ``tokenize=True`` its token ids (no special tokens added: the template writes them). Other keywords
        (``continue_final_message``, ``tools``, template variables) go to transformers.

        Raises ValueError if there is no template."""
        if not self.has_chat_template and not kwargs.get("chat_template"):
            raise ValueError("this model has no chat template; use the completions API with a plain prompt")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


class TokenIdsOnly:
    """Stands in for :class:`Tokenizer` in an engine without one (vLLM's ``skip_tokenizer_init``, or dummy
    weights where the embedded model is not installed): prompts must be token ids, outputs carry token ids
    and empty text, and anything that needs text (stop strings, grammars, chat) is refused by name."""

    hf = None
    has_chat_template = False
    renders_tools = False

    def __init__(self, vocab_size: int, eos_token_ids: list[int] | None = None):
        self.vocab_size = vocab_size
        self.eos_token_ids: set[int] = set(eos_token_ids or [])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        from servelm.engine.sampling_params import InvalidRequestError

        raise InvalidRequestError("this engine has no tokenizer (skip_tokenizer_init): give the prompt as token "
                                  "ids.", "prompt")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""

    def token_bytes(self, token_id: int) -> bytes:
        return b""

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [""] * len(ids)

    def apply_chat_template(self, messages: list[dict], *args, **kwargs):
        raise ValueError("this engine has no tokenizer (skip_tokenizer_init), so it has no chat template")
