"""Server settings: options of ``opt serve``, or ``OPT_SERVE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

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
    keep_alive: str = "5m"
    """How long a model stays loaded after its last request, unless the request says otherwise
    (Ollama's default and forms: "5m", "30s", seconds, 0 = unload at once, negative = forever).
    The model the server was started with stays loaded unless a request sets keep_alive."""
    max_loaded: int = Field(0, ge=0)
    """Most models loaded at once (0: no limit); the least recently used idle one makes room."""
    memory_budget: int | None = Field(None, ge=1)
    """Bytes the loaded models' weights may take together; idle ones are unloaded, least
    recently used first, to stay under it. None: no budget."""
    load_wait_seconds: float = Field(300.0, ge=0.0)
    """How long a load waits for a busy model to finish when it needs that model's room."""
    serve_local_models: bool = True
    """Also list and serve the aliases and the artifacts of ``opt models list``."""
    models_dir: Path | None = None
    """Where created models (blobs, manifests) are kept; None: ``OPT_HOME/ollama``."""
    max_blob_bytes: int = Field(64 * 2**30, ge=1)
    """Largest blob ``POST /api/blobs/:digest`` accepts (a model file; 64 GiB)."""
