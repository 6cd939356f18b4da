"""servelm's inference engine: paged KV cache, continuous batching, sampling. No HTTP, no RAG."""
from servelm.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from servelm.engine.config import EngineConfig
from servelm.engine.llm import LLM
from servelm.engine.llm_engine import EngineStats, LLMEngine
from servelm.engine.models.config import ModelLoadError
from servelm.engine.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from servelm.engine.sampling_params import InvalidRequestError, SamplingParams, StructuredOutputParams

__all__ = ["AsyncEngine", "CompletionOutput", "EngineConfig", "EngineDeadError", "EngineStats", "InvalidRequestError",
           "LLM", "LLMEngine", "Logprob", "ModelLoadError", "RequestFailedError", "RequestOutput",
           "SamplingParams", "StructuredOutputParams", "TokenLogprobs"]
