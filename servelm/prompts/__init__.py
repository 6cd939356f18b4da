"""Prompt engineering: strategies and the layered prompt builder."""
from servelm.prompts.layered import ContextChunk, Example, LayeredPrompt, fence

__all__ = ["ContextChunk", "Example", "LayeredPrompt", "fence"]
