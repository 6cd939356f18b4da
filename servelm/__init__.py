"""servelm: a production LLM serving stack."""
from servelm.engine import LLM, AsyncEngine, EngineConfig, SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineConfig", "SamplingParams"]
__version__ = "0.1.0"
