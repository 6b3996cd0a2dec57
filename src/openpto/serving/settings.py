"""Server settings: options of ``opt serve``, or ``OPT_SERVE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Everything ``create_app`` and the uvicorn runner need; one instance per app."""

    model_config = SettingsConfigDict(env_prefix="OPT_SERVE_", frozen=True)

    host: str = "127.0.0.1"
    """Interface to listen on. Loopback by default: exposing a model is a decision."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port (0 picks a free one)."""
    api_key: str | None = None
    """When set, every route but /health needs ``Authorization: Bearer <api_key>``."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed by CORS; empty means no CORS headers at all."""
    max_request_bytes: int = Field(1_000_000, ge=1024)
    """Larger request bodies get 413. 1 MB holds far more text than the context of small models."""
    max_tokens_limit: int = Field(4096, ge=1)
    """Upper bound on max_tokens / num_predict; also the default when a request sets none."""
    max_prompt_items: int = Field(256, ge=1)
    """Most inputs in one embeddings request or messages in one chat."""
    max_n: int = Field(8, ge=1, le=64)
    """Most choices (n) per OpenAI request; each runs as its own sequence in the batch."""
    log_prompts: bool = False
    """Record prompt/response pairs in the store's prompts table (off: prompts can be private)."""
    access_log: bool = True
    """One JSON line per request on stderr."""
    model_id: str | None = None
    """The model name clients send and see; None uses the backend's name for it."""
    stream_buffer: int = Field(64, ge=1)
    """Events buffered per streaming request before new text is merged into the last one."""
