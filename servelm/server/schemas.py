"""Typed OpenAI-compatible request and response bodies (they also build the OpenAPI page at /docs).

Unknown request fields are ignored, as OpenAI-compatible servers do, so newer SDKs keep working.
"""
from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator, model_serializer,
                      model_validator)
from pydantic_core import PydanticCustomError, PydanticUndefined


# JSON types as OpenAI checks them: "stream": "yes", "n": "2" or "max_tokens": true get a 400 invalid_type
# instead of being coerced (pydantic's lax mode), so a typo like "stream": "false" cannot pass as true.
Bool = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an integer is a number too

_SURROGATE = re.compile("[\ud800-\udfff]")

# The integers a request may carry anywhere (body fields, query and path parameters): 64-bit signed, what
# SQLite, torch and numpy hold. Python's ints have no bound, so without this 2**63 reached SQLite and
# raised OverflowError (a 500).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def first_wide_int(value: Any, path: str = "") -> str | None:
    """Returns the path (``"a.b.0"``) of the first integer in ``value`` (parsed JSON) outside
    ``INT64_MIN..INT64_MAX``, or None when every integer fits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if INT64_MIN <= value <= INT64_MAX else (path or "body")
    if isinstance(value, list) and value and all(type(v) is int for v in value):  # token ids: min/max run in C
        if INT64_MIN <= min(value) and max(value) <= INT64_MAX:
            return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if (found := first_wide_int(v, f"{path}.{k}" if path else str(k))) is not None:
            return found
    return None


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
    """Every request body: unknown fields ignored, strings free of lone surrogates, integers 64-bit."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data):
        return replace_surrogates(data)

    @model_validator(mode="before")
    @classmethod
    def _integers_fit_64_bits(cls, data):
        if (where := first_wide_int(data)) is not None:
            raise PydanticCustomError("integer_out_of_range", f"Invalid value for '{where}': integers must lie "
                                      f"between {INT64_MIN} and {INT64_MAX}.", {"param": where})
        return data


# ---------------------------------------------------------------- shared pieces
class StreamOptions(_Request):
    include_usage: Bool = False


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


class _Body(BaseModel):
    """A chat or completions response body or part of one. OpenAI's required-but-nullable fields (a choice's
    ``logprobs`` and ``finish_reason``, ``message.refusal``, ...) are sent as ``null`` (typed clients generated
    from OpenAI's spec require them); the fields in ``_omit_none`` (servelm's extensions, and what OpenAI
    leaves out when unused, e.g. ``tool_calls``) are left out while None, and those in ``_omit_unset`` unless
    given (a chunk's ``usage``: ``null`` on every chunk only when ``include_usage`` asks for a usage chunk)."""

    _omit_none: ClassVar[frozenset[str]] = frozenset()
    _omit_unset: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_unused(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or not (
            k in self._omit_none or (k in self._omit_unset and k not in self.model_fields_set))}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class _SamplingFields(_Request):
    """Fields shared by chat and completions (ranges are also checked by the engine)."""

    # vLLM request fields servelm does not implement, each with the value that asks for nothing: any other
    # value is a 400 unsupported_parameter, since ignoring it would answer a different question.
    _unsupported: ClassVar[dict[str, Any]] = {
        "use_beam_search": False, "length_penalty": 1.0,
        "truncate_prompt_tokens": None, "return_tokens_as_token_ids": False, "return_token_ids": False,
        "spaces_between_special_tokens": True, "logits_processors": None,
        "guided_whitespace_pattern": None, "priority": 0}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        for name, default in cls._unsupported.items():
            value = data.get(name) if isinstance(data, dict) else None
            if value is not None and value != default and value not in ([], {}):
                also = f" or set it to {json.dumps(default)}" if default is not None else ""
                raise PydanticCustomError("unsupported_parameter", f"{name} is not supported by this server; "
                                          f"remove it{also}.", {"param": name})
        return data

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
    max_tokens: Int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, ge=0.0, le=1.0, description="0 keeps only the most likely token.")
    n: Int = Field(1, ge=1, le=16, description="Completions to return.")
    stop: str | list[str] | None = Field(None, description="Up to 16 strings that end generation.")
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Makes sampling reproducible.")
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema "
                                                   "(enforced by constrained decoding).")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100] "
                                                "added to its logit before sampling; -100 bans the token.")
    # vLLM-style extras
    top_k: Int = Field(0, ge=-1, le=1_000_000)
    min_p: Float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: Float = Field(1.0, gt=0.0)
    min_tokens: Int = Field(0, ge=0)
    ignore_eos: Bool = False
    guided_json: dict | str | None = Field(None, description="vLLM: a JSON schema the output follows.")
    guided_regex: str | None = Field(None, description="vLLM: a regex the output matches.")
    guided_choice: list[str] | None = Field(None, description="vLLM: the output is one of these strings.")
    guided_grammar: str | None = Field(None, description="vLLM: an EBNF grammar (xgrammar's dialect).")
    structured_outputs: dict | None = Field(None, description="vLLM's newer form: one of json, regex, choice, "
                                            "grammar, json_object.")
    stop_token_ids: list[int] | None = Field(None, max_length=256, description="vLLM: token ids that end "
                                             "generation (the token is not part of the text).")
    include_stop_str_in_output: Bool = Field(False, description="vLLM: keep the stop string that ended the text.")
    skip_special_tokens: Bool = Field(True, description="vLLM: leave special tokens (e.g. <|im_end|>) out of the text.")
    allowed_token_ids: list[int] | None = Field(None, max_length=100_000,
                                                description="vLLM: sample only among these token ids.")
    bad_words: list[str] | None = Field(None, max_length=256, description="vLLM: words never to generate.")
    prompt_logprobs: Int | None = Field(None, ge=0, le=20, description="vLLM: the logprob of every prompt token "
                                        "and its k best alternatives, as vLLM returns them (not with stream).")
    speculative: Bool = Field(True, description="false: this request never uses the server's speculative "
                              "decoding (--speculative-config); the output is the same either way.")


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
    k: Int = Field(4, ge=1, le=50)
    filters: dict[str, str | int | float | list[str | int | float]] | None = Field(
        None, description="Metadata filters, e.g. {\"source\": \"guide.pdf\"}.")
    min_relevance: float | None = Field(None, ge=0, le=1, description="Cosine relevance a passage needs (default "
                                        "0.3); below it for every passage the answer says the documents do not "
                                        "contain it.")


class FewShotExample(_Request):
    input: str
    output: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1, description="Alias of max_tokens (newer SDKs).")
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    strategy: str | None = Field(None, description="Prompt strategy: zero_shot, few_shot or chain_of_thought "
                                                   "(servelm extension).")
    include_reasoning: Bool = Field(False, description="chain_of_thought: also return the reasoning as "
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
    parallel_tool_calls: Bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=128, description="Legacy form of tools.")
    function_call: Literal["none", "auto"] | dict | None = Field(None, description="Legacy form of tool_choice "
                                                                 "({\"name\": ...} forces that function).")
    modalities: list[Literal["text", "audio"]] | None = Field(None, description="Only text is served.")
    add_generation_prompt: Bool = Field(True, description="vLLM: open the assistant's turn after the messages.")
    continue_final_message: Bool = Field(False, description="vLLM: continue the last (assistant) message "
                                         "instead of starting a new turn; needs add_generation_prompt false.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM: extra variables for the chat "
                                                        "template (e.g. {\"enable_thinking\": false}).")

    _unsupported: ClassVar[dict[str, Any]] = {**_SamplingFields._unsupported, "chat_template": None,
                                              "documents": None, "echo": False, "add_special_tokens": False,
                                              "mm_processor_kwargs": None}


class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Body):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None  # never filled: the model writes no refusals of its own


class PromptLogprob(BaseModel):
    """One candidate token at one prompt position, in vLLM's ``prompt_logprobs`` (keyed by token id)."""

    logprob: float
    rank: int | None = None  # 1 = most likely; null for the prompt's own token when it is not among the k best
    decoded_token: str


PromptLogprobs = list[dict[int, PromptLogprob] | None]  # per prompt token; the first is null (nothing predicts it)


class _Choice(_Body):
    """What every response choice carries (chat, chat chunk, completion)."""

    _omit_none = frozenset({"servelm", "prompt_logprobs"})

    index: int
    finish_reason: str | None = None
    servelm: dict | None = None  # per choice: review_id or content_filter details


class _Response(_Body):
    """What every generation response and stream chunk carries."""

    _omit_none = frozenset({"servelm", "sources", "prompt_logprobs"})
    _omit_unset = frozenset({"usage"})

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    servelm: dict | None = None  # servelm annotations: review_id, fallback, content_filter


class AssistantMessage(_Body):
    _omit_none = frozenset({"tool_calls", "function_call", "reasoning_content"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None  # OpenAI's refusal text: never set, the model's refusals are its content
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
    prompt_logprobs: PromptLogprobs | None = Field(None, description="With prompt_logprobs (vLLM).")


class DeltaMessage(_Body):
    _omit_none = frozenset({"role", "content", "tool_calls", "function_call"})  # a delta carries what is new

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
    max_tokens: Int | None = Field(16, ge=0, description="Most tokens to generate; 0 with echo scores the "
                                                         "prompt only (logprobs of every prompt token).")
    best_of: Int | None = Field(None, ge=1, description="Accepted only equal to n.")
    logprobs: Int | None = Field(None, ge=0, le=20)
    echo: Bool = False
    suffix: str | None = None

    _unsupported: ClassVar[dict[str, Any]] = {**_SamplingFields._unsupported, "add_special_tokens": True}


class CompletionLogprobs(_Body):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None  # with prompt_logprobs (vLLM)


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- embeddings
class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A text, a list of up to 256 texts, one list of token ids or a list of them. "
                                      "Token ids are the EMBEDDING model's (docs/server.md).")
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = Field(None, description="None = float.")
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="vLLM: keep the last k tokens of a longer "
                                               "input; -1 = the model's limit. Without it (or truncate) a longer "
                                               "input is a 400.")
    truncate: bool = Field(False, description="TEI: keep the first tokens of a longer input, up to the model's limit.")

    @field_validator("input", mode="before")
    @classmethod
    def _ids_are_ints(cls, v):
        # pydantic's lax int would read true or 1.0 as a token id
        for x in v if isinstance(v, list) else ():
            if any(isinstance(t, (bool, float)) for t in (x if isinstance(x, list) else [x])):
                raise ValueError("token ids must be integers")
        return v


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
    """The simple endpoint: a raw prompt (no chat template) and the common sampling fields."""

    prompt: str = Field(..., min_length=1)
    max_tokens: Int = Field(150, ge=1)
    temperature: Float = Field(0.7, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1, description="0 or -1: off.")
    stop: str | list[str] | None = Field(None, description="Up to 16 strings that end generation (not returned).")
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Makes sampling reproducible.")
    repetition_penalty: Float = Field(1.0, gt=0.0)
    stream: Bool = Field(False, description='Server-sent events of {"text": delta}; the last one also carries '
                         "finish_reason and tokens_generated; then data: [DONE].")


class GenerateResponse(_Body):
    _omit_none = frozenset({"servelm"})

    text: str
    tokens_generated: int
    finish_reason: str | None = None  # stop, length or content_filter
    servelm: dict | None = None  # what the output guard changed (servelm extension)
