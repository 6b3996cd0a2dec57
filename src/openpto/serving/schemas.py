"""Request bodies of both API families, with their limits declared on the fields.

Unknown fields are ignored (clients send options this server does not use, such as ``user``,
``store``, ``strict``); fields that would change the output in a way this server cannot honour
(logprobs, images) are accepted by the schema and refused by the routes with a 400 that names
them. Tool definitions and JSON schemas are checked by ``serving.tools``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_MAX_TEXT = 1_000_000  # characters in one string; the byte limit of the request is lower anyway
_MAX_ITEMS = 1024


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- OpenAI ----------------------------------------------------------------------------------------


class ContentPart(_Lenient):
    type: str
    text: str | None = Field(None, max_length=_MAX_TEXT)


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=_MAX_ITEMS)
    tool_call_id: str | None = Field(None, max_length=256)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str = Field(..., min_length=1, max_length=512)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=_MAX_ITEMS)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=_MAX_ITEMS)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., max_length=_MAX_ITEMS)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's documented default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=64)


class EmbeddingRequest(_Lenient):
    model: str = Field(..., min_length=1, max_length=512)
    input: str | list[str] | list[int] | list[list[int]] = Field(..., max_length=_MAX_ITEMS)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# -- Ollama ----------------------------------------------------------------------------------------


class OllamaOptions(_Lenient):
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    num_predict: int | None = Field(None, ge=-2)  # -1: until the context ends, -2: fill it
    stop: list[str] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=-1, le=2**63 - 1)
    num_ctx: int | None = Field(None, ge=1)


class OllamaMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field("", max_length=_MAX_TEXT)
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=_MAX_ITEMS)
    tool_name: str | None = Field(None, max_length=256)


class _OllamaBase(_Lenient):
    model: str = Field(..., min_length=1, max_length=512)
    options: OllamaOptions | None = None
    stream: bool = True  # Ollama streams unless told not to
    keep_alive: float | str | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None


class OllamaGenerateRequest(_OllamaBase):
    prompt: str = Field("", max_length=_MAX_TEXT)
    suffix: str | None = None
    system: str | None = Field(None, max_length=_MAX_TEXT)
    template: str | None = None
    context: list[int] | None = Field(None, max_length=1_000_000)
    raw: bool = False
    images: list[str] | None = None


class OllamaChatRequest(_OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=_MAX_ITEMS)
    tools: list[dict[str, Any]] | None = Field(None, max_length=_MAX_ITEMS)


class OllamaEmbedRequest(_Lenient):
    model: str = Field(..., min_length=1, max_length=512)
    input: str | list[str] = Field(..., max_length=_MAX_ITEMS)
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: OllamaOptions | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsRequest(_Lenient):
    """The older single-text endpoint ``/api/embeddings``."""

    model: str = Field(..., min_length=1, max_length=512)
    prompt: str = Field("", max_length=_MAX_TEXT)


class OllamaShowRequest(_Lenient):
    model: str | None = Field(None, max_length=512)
    name: str | None = Field(None, max_length=512)  # the field's name before Ollama 0.1.40
    verbose: bool = False
