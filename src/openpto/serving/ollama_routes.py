"""Ollama-compatible routes: generate and chat (NDJSON streaming), embed, version (tags, show,
ps and the model management are in ``model_routes``).

Sampling defaults follow Ollama's documented ones (temperature 0.8, top_k 40, top_p 0.9) except
``repeat_penalty``, which stays off unless asked for: Ollama applies it to the last 64 tokens and
this server to the whole context, so a default-on penalty would change outputs more than it should.
Not supported, refused with a 400: images, tools, ``format`` (JSON mode), ``suffix``.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from openpto import __version__
from openpto.core.sampling import SamplingParams
from openpto.engines.streams import RequestStream
from openpto.serving.deps import ServiceDep, require_api_key
from openpto.serving.errors import APIError
from openpto.serving.model_defaults import model_system, with_model_messages, with_model_parameters
from openpto.serving.schemas import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaOptions,
)
from openpto.serving.service import Completion, Service

router = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)], tags=["ollama"])

_NS = 1_000_000_000


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _params(service: Service, options: OllamaOptions | None, prompt_tokens: int) -> SamplingParams:
    o = with_model_parameters(service, options)
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    return service.sampling(
        max_tokens=max_tokens, prompt_tokens=prompt_tokens,
        temperature=0.8 if o.temperature is None else o.temperature,
        top_p=0.9 if o.top_p is None else o.top_p,
        top_k=40 if o.top_k is None else o.top_k,
        min_p=o.min_p, repetition_penalty=o.repeat_penalty, stop=o.stop,
        seed=None if o.seed is None or o.seed < 0 else o.seed,
    )


def _refuse(**unsupported: Any) -> None:
    for name, value in unsupported.items():
        if value:
            raise APIError(400, f"{name} is not supported by this server")


def _final(service: Service, done: Completion, prompt_tokens: int) -> dict[str, Any]:
    t = done.timings
    return {
        "done": True,
        "done_reason": done.finish_reason,
        "total_duration": int(t.total_seconds * _NS),
        "load_duration": int(service.acquire_seconds * _NS),  # loading it for this request
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": int(t.prefill_seconds * _NS),
        "eval_count": done.completion_tokens,
        "eval_duration": int(t.decode_seconds * _NS),
    }


async def _respond(service: Service, request: Request, stream: RequestStream, *, streaming: bool,
                   prompt: str, prompt_tokens: int, piece: Any) -> Any:
    """NDJSON records while streaming, or one JSON object; ``piece(text)`` shapes the payload."""
    base = {"model": service.model_id}
    if not streaming:
        done = await service.collect(stream, request)
        await service.log_prompt(prompt, done)
        return {**base, "created_at": _now(), **piece(done.text),
                **_final(service, done, prompt_tokens)}

    async def lines() -> AsyncIterator[str]:
        parts: list[str] = []
        tokens = 0
        try:
            async for event in service.events(stream):
                tokens += event.tokens
                if event.text:
                    parts.append(event.text)
                    yield json.dumps({**base, "created_at": _now(), **piece(event.text),
                                      "done": False}) + "\n"
                if event.finish_reason is not None:
                    done = Completion("".join(parts), event.finish_reason, prompt_tokens, tokens,
                                      event)
                    yield json.dumps({**base, "created_at": _now(), **piece(""),
                                      **_final(service, done, prompt_tokens)}) + "\n"
                    await service.log_prompt(prompt, done)
        except APIError as exc:  # headers are sent: report in-band, as Ollama does
            yield json.dumps({"error": exc.message}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _loaded(service: Service, extra: dict[str, Any]) -> dict[str, Any]:
    """Ollama's answer to an empty prompt: the model is loaded, nothing is generated."""
    return {"model": service.model_id, "created_at": _now(), **extra, "done": True,
            "done_reason": "load"}


@router.post("/generate")
async def generate(body: OllamaGenerateRequest, request: Request, service: ServiceDep) -> Any:
    service = await service.use(body.model, body.keep_alive)
    _refuse(images=body.images, format=body.format, suffix=body.suffix, template=body.template)
    if not body.prompt and not body.context:
        return _loaded(service, {"response": ""})
    if body.raw:
        prompt = body.prompt
    else:
        system = body.system or model_system(service)
        messages = [{"role": "system", "content": system}] if system else []
        prompt = service.engine.chat_prompt([*messages, {"role": "user", "content": body.prompt}])
    context = service.check_token_ids(body.context, "context") if body.context else []
    ids = context + (service.prompt_ids(prompt) if body.prompt else [])
    stream = service.start(ids, _params(service, body.options, len(ids)))
    return await _respond(service, request, stream, streaming=body.stream, prompt=prompt,
                          prompt_tokens=len(ids), piece=lambda text: {"response": text})


@router.post("/chat")
async def chat(body: OllamaChatRequest, request: Request, service: ServiceDep) -> Any:
    service = await service.use(body.model, body.keep_alive)
    _refuse(tools=body.tools, format=body.format,
            images=any(m.images for m in body.messages))
    if not body.messages:
        return _loaded(service, {"message": {"role": "assistant", "content": ""}})
    prompt = service.engine.chat_prompt(with_model_messages(service, [
        {"role": m.role, "content": m.content} for m in body.messages]))
    ids = service.prompt_ids(prompt)
    stream = service.start(ids, _params(service, body.options, len(ids)))
    return await _respond(service, request, stream, streaming=body.stream, prompt=prompt,
                          prompt_tokens=len(ids),
                          piece=lambda text: {"message": {"role": "assistant", "content": text}})


@router.get("/version")
async def version() -> Any:
    return {"version": __version__}


@router.post("/embed")
async def embed(body: OllamaEmbedRequest, service: ServiceDep) -> Any:
    service = await service.use(body.model, body.keep_alive)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not body.truncate:
        context = service.engine.info.context_length
        for text in texts:
            if len(service.engine.tokenize(text)) > context:
                raise APIError(400, f"an input is longer than the context ({context} tokens) "
                                    "and truncate is false")
    started = time.perf_counter()
    result = await service.embed(texts)
    return {"model": service.model_id, "embeddings": result.vectors,
            "total_duration": int((time.perf_counter() - started) * _NS),
            "load_duration": int(service.acquire_seconds * _NS),
            "prompt_eval_count": result.tokens}


@router.post("/embeddings")
async def embeddings(body: OllamaEmbeddingsRequest, service: ServiceDep) -> Any:
    service = await service.use(body.model)
    result = await service.embed([body.prompt])
    return {"embedding": result.vectors[0]}
