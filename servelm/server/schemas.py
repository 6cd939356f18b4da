"""Typed OpenAI-compatible request and response bodies (they also build the OpenAPI page at /docs).

Unknown request fields are ignored, as OpenAI-compatible servers do, so newer SDKs keep working.
"""
from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticUndefined


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(value: Any) -> Any:
    """Returns ``value`` (parsed JSON) with every unpaired UTF-16 surrogate in its strings and keys replaced
    by U+FFFD; a pair sent as two raw surrogates becomes the character it encodes.

    JSON allows ``"\\ud83d"`` alone (JavaScript writes one whenever it cuts a string inside an emoji) and
    Python's ``json.loads`` lets raw surrogate bytes through, but no tokenizer or database takes such a
    string: replacing it, as a UTF-8 decoder would, keeps a cut emoji from turning into a 500."""
    if isinstance(value, str):
        if _SURROGATE.search(value) is None:
            return value
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, list):
        return [replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {replace_surrogates(k): replace_surrogates(v) for k, v in value.items()}
    return value


class _Request(BaseModel):
    """Every request body: unknown fields ignored, strings free of lone surrogates."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        return replace_surrogates(data)


# ---------------------------------------------------------------- shared pieces
class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    """``json_object``: the answer is a JSON object; ``json_schema``: it follows ``json_schema.schema``
    (``{"name", "schema", "strict"}``; enforced whatever ``strict`` says). Both by constrained decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class FunctionDefinition(_Request):
    name: str = Field(..., min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class _SamplingFields(_Request):
    """Fields shared by chat and completions (ranges are also checked by the engine)."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        """OpenAI reads ``null`` as "not set" (SDK wrappers send e.g. ``"temperature": null``): such a field
        gets its default. Required fields stay required."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].default in (None, PydanticUndefined)}

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v, info: ValidationInfo):
        # OpenAI answers 400 here too, rather than ignoring options that would never apply.
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    model: str | None = Field(None, description="Model id from /v1/models; default: the served model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="Completions to return.")
    stop: str | list[str] | None = Field(None, description="Up to 16 strings that end generation.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Makes sampling reproducible.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema "
                                                   "(enforced by constrained decoding).")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100] "
                                                "added to its logit before sampling; -100 bans the token.")
    # vLLM-style extras
    top_k: int = Field(0, ge=-1, le=1_000_000)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    guided_json: dict | str | None = Field(None, description="vLLM: a JSON schema the output follows.")
    guided_regex: str | None = Field(None, description="vLLM: a regex the output matches.")
    guided_choice: list[str] | None = Field(None, description="vLLM: the output is one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM: an EBNF grammar (xgrammar's dialect).")
    structured_outputs: dict | None = Field(None, description="vLLM's newer form: one of json, regex, choice, "
                                            "grammar, json_object.")


# ---------------------------------------------------------------- chat
class ContentPart(_Request):
    """A message part: ``{"type": "text", "text": ...}``, or in an assistant message OpenAI's
    ``{"type": "refusal", "refusal": ...}`` (read as text). The model reads text only."""

    type: str
    text: str | None = None
    refusal: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        ..., description="function: the legacy form of a tool result (read as a tool message).")
    content: str | list[ContentPart] | None = None
    name: str | None = None               # passed to the chat template; a function message's function
    tool_calls: list[dict] | None = None  # an assistant turn that called tools (passed to the chat template)
    tool_call_id: str | None = None       # a tool turn's answer to one of them
    function_call: dict | None = None     # the legacy form of one tool call: {"name", "arguments"}

    def text(self) -> str:
        """Returns the message's text (text and refusal parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if p.type == "text" else p.refusal for p in self.content)


class RagOptions(_Request):
    """Retrieval-augmented generation: ground the answer in ``k`` passages of ``collection``."""

    collection: str = Field(..., min_length=1)
    k: int = Field(4, ge=1, le=50)
    filters: dict[str, str | int | float | list[str | int | float]] | None = Field(
        None, description="Metadata filters, e.g. {\"source\": \"guide.pdf\"}.")


class FewShotExample(_Request):
    input: str
    output: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (newer SDKs).")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    strategy: str | None = Field(None, description="Prompt strategy: zero_shot, few_shot or chain_of_thought "
                                                   "(servelm extension).")
    include_reasoning: bool = Field(False, description="chain_of_thought: also return the reasoning as "
                                                       "message.reasoning_content (servelm extension).")
    examples: list[FewShotExample] | None = Field(None, max_length=32,
                                                  description="few_shot: demonstrations (servelm extension).")
    rag: RagOptions | None = Field(None, description="Retrieval options (servelm extension).")
    tools: list[Tool] | None = Field(None, max_length=128, description="Passed to the model's chat template (or "
                                     "described in the system message where the template has no tool support); "
                                     "with tool_choice auto, calls the model writes come back as "
                                     "message.tool_calls.")
    tool_choice: Literal["none", "auto", "required"] | dict | None = Field(
        None, description="required or {\"type\": \"function\", \"function\": {\"name\": ...}}: the answer is "
                          "a call (constrained decoding), returned as message.tool_calls; auto (the default with "
                          "tools): calls the model writes are parsed out of its answer; none: tools are ignored.")
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=128, description="Legacy form of tools.")
    function_call: Literal["none", "auto"] | dict | None = Field(None, description="Legacy form of tool_choice "
                                                                 "({\"name\": ...} forces that function).")
    modalities: list[Literal["text", "audio"]] | None = Field(None, description="Only text is served.")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class _Choice(BaseModel):
    """What every response choice carries (chat, chat chunk, completion)."""

    index: int
    finish_reason: str | None = None
    servelm: dict | None = None  # per choice: review_id or content_filter details


class _Response(BaseModel):
    """What every generation response and stream chunk carries."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    servelm: dict | None = None  # servelm annotations: review_id, fallback, content_filter


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict] | None = None  # a forced tool call: [{id, type, function: {name, arguments}}]
    function_call: dict | None = None  # the legacy form: {name, arguments}
    reasoning_content: str | None = None  # chain_of_thought with include_reasoning (vLLM's field name)


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    sources: list[dict] | None = Field(None, description="With 'rag': the cited chunks (servelm extension).")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None  # [{index, id?, type?, function: {name?, arguments}}], as OpenAI streams
    function_call: dict | None = None


class ChatChunkChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    sources: list[dict] | None = None  # with 'rag': sent once, in a chunk with no choices after the answer


# ---------------------------------------------------------------- completions
class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="Text or token ids, or a batch of either (up to 256, and no more than the "
                         "server admits at once): choice j of prompt i has index i * n + j.")
    max_tokens: int | None = Field(16, ge=0, description="Most tokens to generate; 0 with echo scores the "
                                                         "prompt only (logprobs of every prompt token).")
    best_of: int | None = Field(None, ge=1, description="Accepted only equal to n.")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- embeddings
class EmbeddingRequest(_Request):
    input: str | list[str] = Field(..., description="A text or a list of up to 256 texts.")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# ---------------------------------------------------------------- models, /generate
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "servelm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GenerateRequest(_Request):
    prompt: str = Field(..., min_length=1)
    max_tokens: int = Field(150, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)


class GenerateResponse(BaseModel):
    text: str
    tokens_generated: int
