"""What a created model brings to a request: its parameters, system prompt and messages (as
``/api/create`` stored them), and the model cards ``/v1/models`` lists."""

from __future__ import annotations

from typing import Any

from openpto.serving.schemas import OllamaOptions
from openpto.serving.service import Service


def _manifest(service: Service) -> Any:
    return None if service.model is None else service.model.entry.manifest


def with_model_parameters(service: Service, options: OllamaOptions | None) -> OllamaOptions:
    """The request's options over the model's stored parameters (Ollama's precedence)."""
    manifest = _manifest(service)
    stored = dict(manifest.parameters) if manifest is not None else {}
    given = options.model_dump(exclude_none=True) if options is not None else {}
    return OllamaOptions.model_validate({**stored, **given})


def model_system(service: Service) -> str:
    manifest = _manifest(service)
    return str(manifest.system) if manifest is not None else ""


def with_model_messages(service: Service, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model's stored messages first, and its system prompt unless the request has one."""
    manifest = _manifest(service)
    if manifest is None:
        return messages
    result = [*manifest.messages, *messages]
    if manifest.system and not any(m.get("role") == "system" for m in result):
        result.insert(0, {"role": "system", "content": manifest.system})
    return result


def model_cards(service: Service, name: str | None = None) -> list[dict[str, Any]]:
    """``/v1/models`` entries: every model the server can serve, loaded or not."""
    pool = service.pool
    if pool is None:
        info = service.engine.info
        return [{"id": service.model_id, "object": "model", "created": info.created,
                 "owned_by": "openpto", "backend": info.backend,
                 "context_length": info.context_length}]
    entries = [pool.find(name)] if name is not None else pool.catalog()
    cards = []
    for entry in entries:
        loaded = pool.loaded(entry.name)
        card: dict[str, Any] = {"id": entry.name, "object": "model", "created": int(entry.modified),
                                "owned_by": "openpto",
                                "backend": loaded.backend if loaded else pool.backend_for(entry)}
        if loaded is not None:
            card["context_length"] = loaded.engine.info.context_length
        cards.append(card)
    return cards
