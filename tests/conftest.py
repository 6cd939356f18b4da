"""Shared fixtures: the embedded model is loaded once per test session and shared by engines."""
from __future__ import annotations

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
    """Build an ``LLM`` over the shared SmolLM2 weights with any engine settings."""
    def make(**kwargs) -> LLM:
        return LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", device="cpu", **kwargs), loaded=smol_loaded))
    return make


@pytest.fixture(scope="session")
def smol(make_llm) -> LLM:
    return make_llm()
