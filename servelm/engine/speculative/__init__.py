"""Speculative decoding: a proposer guesses the next few tokens, one forward pass verifies them all.

``config`` parses vLLM's ``speculative_config``; ``proposer`` holds the :class:`Proposer` interface and the
n-gram (prompt lookup) proposer; ``draft`` the draft-model proposer; ``verify`` accepts proposals so that the output distribution is exactly
the target model's (exact match when greedy, rejection sampling otherwise).
"""
from servelm.engine.speculative.config import SpeculativeConfig
from servelm.engine.speculative.proposer import NgramProposer, Proposer

__all__ = ["NgramProposer", "Proposer", "SpeculativeConfig"]
