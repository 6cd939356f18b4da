"""Named prompt strategies: ``zero_shot``, ``few_shot`` and ``chain_of_thought``.

A strategy turns a request (question, optional retrieved context, history, examples)
into a :class:`LayeredPrompt`, and from there into the model's own chat template.
Strategies only ever add *trusted* text (their instructions) to the system message;
everything the user or a document supplied stays fenced in user turns.

Usage by the server::

    strategy = resolve_strategy(request.strategy, deployment_default="zero_shot")
    prompt_text = strategy.render(tokenizer, PromptRequest(question=..., system=...))
    answer = strategy.postprocess(generated_text, include_reasoning=request.include_reasoning)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

from servelm.prompts.layered import ContextChunk, Example, LayeredPrompt

DEFAULT_SYSTEM = "You are a helpful, concise assistant."
# The fixed RAG answer when the documents do not hold the answer, or retrieval found
# nothing relevant (the server can return it without calling the model at all).
NOT_IN_DOCUMENTS = "I could not find the answer in the provided documents."
GROUNDING_INSTRUCTION = (
    "Answer only from the documents in <context>, citing them as [index]. If they do not contain "
    f"the answer, reply exactly: \"{NOT_IN_DOCUMENTS}\""
)


class UnknownStrategyError(ValueError):
    """A request or deployment named a strategy that is not registered (maps to HTTP 400)."""

    def __init__(self, name: str, known: list[str]):
        self.param = "strategy"
        self.message = f"unknown prompt strategy {name!r}; choose one of: {', '.join(sorted(known))}"
        super().__init__(self.message)


@dataclass(slots=True)
class PromptRequest:
    """What a strategy needs to build a prompt; every field but ``question`` is optional."""

    question: str
    system: str = DEFAULT_SYSTEM
    context: list[ContextChunk] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    examples: list[Example] | None = None  # inline few-shot examples from the request
    grounded: bool = True  # with context: answer only from it, else NOT_IN_DOCUMENTS


@dataclass(slots=True)
class StrategyOutput:
    """The client-facing answer after post-processing; ``reasoning`` only on request."""

    answer: str
    reasoning: str | None = None


class Strategy(Protocol):
    name: str

    def build(self, req: PromptRequest) -> LayeredPrompt: ...
    def postprocess(self, text: str, include_reasoning: bool = False) -> StrategyOutput: ...


def is_not_in_documents(answer: str) -> bool:
    """Return True when ``answer`` is the model's "not in the documents" reply."""
    return NOT_IN_DOCUMENTS.lower().rstrip(".") in " ".join(answer.lower().split())


def render_chat(tokenizer, messages: list[dict]) -> str:
    """Return ``messages`` rendered through ``tokenizer``'s chat template, ready for generation.

    Accepts a Hugging Face tokenizer or servelm's engine tokenizer (whose
    ``apply_chat_template`` already returns text).
    """
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TypeError:  # servelm.engine.tokenizer.Tokenizer has no ``tokenize`` keyword
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


class _Base:
    name = "base"
    instructions = ""

    def _examples(self, req: PromptRequest) -> list[Example]:
        return []

    def build(self, req: PromptRequest) -> LayeredPrompt:
        """Return the layered prompt for ``req`` (system → examples → context → question)."""
        if not isinstance(req.question, str) or not req.question.strip():
            raise ValueError("question must be a non-empty string")
        instructions = self.instructions
        if req.context and req.grounded:
            instructions = f"{GROUNDING_INSTRUCTION}\n{instructions}".strip()
        return LayeredPrompt(system=req.system, question=req.question, examples=self._examples(req),
                             context=list(req.context), history=list(req.history),
                             instructions=instructions)

    def messages(self, req: PromptRequest) -> list[dict]:
        """Return the chat messages for ``req``."""
        return self.build(req).to_messages()

    def render(self, tokenizer, req: PromptRequest) -> str:
        """Return the prompt text for ``req`` through the model's chat template."""
        return render_chat(tokenizer, self.messages(req))

    def postprocess(self, text: str, include_reasoning: bool = False) -> StrategyOutput:
        """Return the model's text unchanged as the answer."""
        return StrategyOutput(answer=text.strip())


class ZeroShot(_Base):
    """Just the instruction and the question."""

    name = "zero_shot"


class FewShot(_Base):
    """Demonstrations before the question: inline from the request, else picked from a set.

    ``selector`` (e.g. :class:`servelm.prompts.examples.ExampleSelector`) returns the ``k``
    examples most similar to the question; inline examples always win.
    """

    name = "few_shot"

    def __init__(self, examples: list[Example] | None = None, selector=None, k: int = 3):
        self.default_examples = list(examples or [])
        self.selector = selector
        self.k = k

    def _examples(self, req: PromptRequest) -> list[Example]:
        if req.examples:
            return list(req.examples)
        if self.selector is not None:
            return self.selector.select(req.question, self.k)
        return self.default_examples[: self.k]


FINAL_MARKER = "Final answer:"
_FINAL_RE = re.compile(r"(?im)^\s*(?:\*\*)?\s*final\s+answer\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?")


class ChainOfThought(_Base):
    """Reason step by step, then a line starting with ``Final answer:``."""

    name = "chain_of_thought"
    instructions = (
        "Think through the problem step by step before answering. Write your reasoning first, "
        f"then finish with one line that starts with \"{FINAL_MARKER}\" followed by the answer only."
    )

    def postprocess(self, text: str, include_reasoning: bool = False) -> StrategyOutput:
        """Return the final answer (and the reasoning when asked) parsed from ``text``."""
        answer, reasoning = parse_chain_of_thought(text)
        return StrategyOutput(answer=answer, reasoning=reasoning if include_reasoning else None)


def parse_chain_of_thought(text: str) -> tuple[str, str]:
    """Split a chain-of-thought completion into ``(final_answer, reasoning)``.

    The last ``Final answer:`` marker wins (a model may restate it). Without a marker
    the whole text is the answer and the reasoning is empty, so nothing is lost.
    """
    matches = list(_FINAL_RE.finditer(text or ""))
    if not matches:
        return (text or "").strip(), ""
    m = matches[-1]
    answer = text[m.end():].strip().strip("*").strip()
    return answer, text[: m.start()].strip()


_REGISTRY: dict[str, Callable[[], Strategy]] = {
    "zero_shot": ZeroShot,
    "few_shot": FewShot,
    "chain_of_thought": ChainOfThought,
}
_INSTANCES: dict[str, Strategy] = {}


def register_strategy(name: str, strategy: Strategy | Callable[[], Strategy]) -> None:
    """Register ``strategy`` (an instance or a factory) under ``name``; replaces an earlier one."""
    _INSTANCES.pop(name, None)
    if callable(strategy) and not hasattr(strategy, "build"):
        _REGISTRY[name] = strategy
    else:
        _REGISTRY[name] = lambda s=strategy: s


def strategy_names() -> list[str]:
    """Return the registered strategy names, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """Return the strategy registered as ``name``; raises :class:`UnknownStrategyError`."""
    if name not in _REGISTRY:
        raise UnknownStrategyError(name, list(_REGISTRY))
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def resolve_strategy(requested: str | None, deployment_default: str = "zero_shot") -> Strategy:
    """Return the request's strategy, else the deployment's; raises :class:`UnknownStrategyError`."""
    return get_strategy(requested or deployment_default)
