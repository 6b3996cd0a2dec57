"""The HTTP server: OpenAI- and Ollama-compatible APIs over an engine of ``openpto.engines``.

    from openpto.serving import ServerSettings, create_app, make_engine, EngineOptions
    app = create_app(ServerSettings(), make_engine("torch", "smollm2-135m", EngineOptions()))

Clients point at it as they would at OpenAI or Ollama (``opt serve --api-key KEY`` first):

    openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    ollama.Client(host="http://127.0.0.1:8000", headers={"Authorization": "Bearer KEY"})
    # llm: an entry in extra-openai-models.yaml
    - model_id: smollm2
      model_name: smollm2-135m
      api_base: http://127.0.0.1:8000/v1

Importing this package needs the ``serve`` extra (fastapi, uvicorn, prometheus-client).
"""

from openpto.errors import require

require("fastapi", "serve", "the HTTP server")
require("prometheus_client", "serve", "the server's /metrics")
require("uvicorn", "serve", "the HTTP server")

from openpto.engines.engine import (  # noqa: E402
    BACKENDS,
    Engine,
    EngineOptions,
    ModelInfo,
    make_engine,
)
from openpto.serving.app import create_app, serve, serve_model  # noqa: E402
from openpto.serving.pool import pool_settings  # noqa: E402
from openpto.serving.settings import ServerSettings  # noqa: E402

__all__ = ["BACKENDS", "Engine", "EngineOptions", "ModelInfo", "ServerSettings", "create_app",
           "make_engine", "pool_settings", "serve", "serve_model"]
