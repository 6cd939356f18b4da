"""Prompt engineering: strategies and the layered prompt builder."""
from servelm.prompts.layered import ContextChunk, Example, LayeredPrompt, fence
from servelm.prompts.strategies import (
    NOT_IN_DOCUMENTS,
    ChainOfThought,
    FewShot,
    PromptRequest,
    StrategyOutput,
    UnknownStrategyError,
    ZeroShot,
    get_strategy,
    is_not_in_documents,
    parse_chain_of_thought,
    register_strategy,
    render_chat,
    resolve_strategy,
    strategy_names,
)

__all__ = [
    "NOT_IN_DOCUMENTS", "is_not_in_documents", "ChainOfThought", "ContextChunk", "Example", "FewShot", "LayeredPrompt", "PromptRequest",
    "StrategyOutput", "UnknownStrategyError", "ZeroShot", "fence", "get_strategy",
    "parse_chain_of_thought", "register_strategy", "render_chat", "resolve_strategy", "strategy_names",
]
