"""Shared fixtures: the embedded model is loaded once per test session and shared by engines."""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from servelm.engine import LLM, EngineConfig, LLMEngine
from servelm.engine.models.loader import default_model_path, load_model


@pytest.fixture(scope="session")
def smol_path():
    return default_model_path()


@pytest.fixture(scope="session")
def smol_loaded():
    """The embedded SmolLM2 GGUF, dequantized to float32 on the CPU."""
    return load_model(None, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="session")
def make_llm(smol_loaded):
    """Build an ``LLM`` over the shared SmolLM2 weights with any engine settings (a 256 MiB KV pool unless
    the test sizes it: the default takes a share of free memory, and the suite builds many engines)."""
    def make(**kwargs) -> LLM:
        if "num_kv_blocks" not in kwargs:
            kwargs.setdefault("kv_cache_memory_bytes", 256 << 20)
        return LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", device="cpu", **kwargs), loaded=smol_loaded))
    return make


@pytest.fixture(scope="session")
def clone_smol(smol_loaded):
    """A private copy of the loaded SmolLM2 weights in ``dtype`` (for tests that modify the model, e.g. quantize)."""
    def clone(dtype: torch.dtype):
        c = copy.deepcopy(smol_loaded)  # deepcopy keeps the tied embedding/lm_head tied
        for p in c.model.parameters():
            p.data = p.data.to(dtype)
        return c
    return clone


@pytest.fixture(scope="session")
def smol(make_llm) -> LLM:
    return make_llm()


@pytest.fixture(scope="session")
def tokenizer(smol_path):
    """The embedded SmolLM2's tokenizer, as the server loads it."""
    from servelm.engine.tokenizer import Tokenizer

    return Tokenizer.from_source(smol_path)


# The real server the OpenAI-facing tests share (tests/server_harness.py starts it once per session).
# A module that needs another server defines its own ``srv``; one that uses ``client`` defines ``key``.
@pytest.fixture(scope="module")
def srv():
    """The suite's main server (embedded SmolLM2, auth and guard on)."""
    from server_harness import fleet

    return fleet().get("main")


@pytest.fixture(scope="module")
def client(srv, key):
    """The OpenAI SDK pointed at ``srv`` with the module's ``key``."""
    from server_harness import openai_client

    return openai_client(srv, key)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, tokenizer):
    """A builder of tiny random transformers checkpoints: ``make(kind, config, init=None)`` returns
    ``(directory, the transformers model)``, built once per kind from ``config()`` with seed 0 (then
    ``init(model)`` under no_grad, if given) and saved as safetensors with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM

    made = {}

    def make(kind: str, config, init=None):
        if kind not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config()).eval()
            if init is not None:
                with torch.no_grad():
                    init(model)
            d = tmp_path_factory.mktemp(f"tiny-{kind}")
            model.save_pretrained(d, safe_serialization=True)
            tokenizer.hf.save_pretrained(d)
            made[kind] = (d, model)
        return made[kind]
    return make
