"""servelm: a production LLM serving stack.

The engine (and torch) load on first use, so light commands such as ``servelm keys`` start fast.
"""
__version__ = "0.1.0"
__all__ = ["LLM", "AsyncEngine", "EngineConfig", "SamplingParams"]


def __getattr__(name: str):
    if name in __all__:
        import servelm.engine as engine

        return getattr(engine, name)
    raise AttributeError(f"module 'servelm' has no attribute {name!r}")
