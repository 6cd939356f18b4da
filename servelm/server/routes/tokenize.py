"""POST /tokenize and /detokenize with vLLM's shapes, over the chat model's tokenizer (needs the chat scope)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, model_validator

from servelm.server.auth import require
from servelm.server.context import get_context
from servelm.server.errors import invalid
from servelm.server.routes.chat import render_prompt, turn_messages
from servelm.server.schemas import ChatMessage, _Request

router = APIRouter(tags=["vllm"], dependencies=[Depends(require("chat"))])


class TokenizeRequest(_Request):
    """vLLM's TokenizeCompletionRequest (``prompt``) or TokenizeChatRequest (``messages``)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = Field(True, description="messages: end with the assistant turn's opening.")
    add_special_tokens: bool | None = Field(None, description="Default: true for a prompt (as /v1/completions "
                                            "reads it), false for messages (the chat template writes them).")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True,
             summary="Token ids of a prompt, or of messages as the chat route renders them")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Returns the ids the model would read (chat: the same rendering as /v1/chat/completions without
    tools, strategy or RAG), their count and the context window. Raises APIError 400/404."""
    ctx = get_context(request)
    ctx.check_model(body.model)
    tok = ctx.engine.tokenizer
    if body.prompt is not None:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        messages = turn_messages(body.messages)
        if body.add_generation_prompt:
            text = render_prompt(tok, messages)
        else:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=False)
            except Exception as e:  # the template rejects e.g. a role order it cannot render
                raise invalid(f"The messages cannot be rendered by this model's chat template: {e}",
                              "messages") from None
        ids = tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
    strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=ctx.engine.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of token ids")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Returns the text of ``tokens`` (special tokens kept, as vLLM does); 400 for an id outside the vocabulary."""
    ctx = get_context(request)
    ctx.check_model(body.model)
    tok = ctx.engine.tokenizer
    bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise invalid(f"Token id {bad} is outside the vocabulary (0 to {tok.vocab_size - 1}).", "tokens",
                      "invalid_value")
    return DetokenizeResponse(prompt=tok.decode(body.tokens, skip_special_tokens=False))
