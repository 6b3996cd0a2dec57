"""Ollama-compatible routes: generate and chat (NDJSON streaming), tags, show, ps, embed, version.

Sampling defaults follow Ollama's documented ones (temperature 0.8, top_k 40, top_p 0.9) except
``repeat_penalty``, which stays off unless asked for: Ollama applies it to the last 64 tokens and
this server to the whole context, so a default-on penalty would change outputs more than it should.
Chat takes ``tools`` (the model may call them: ``tool_choice`` auto, see ``serving.tools``;
calls come back as ``message.tool_calls`` with ``function.arguments`` an object) and ``format``
(``"json"`` or a JSON Schema, decoded under its grammar). Not supported, refused with a 400:
images, ``format`` on generate, ``suffix``.
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
from openpto.engines.tool_calls import ToolCallStream
from openpto.serving import tools as tool_plans
from openpto.serving.deps import ServiceDep, require_api_key
from openpto.serving.errors import APIError
from openpto.serving.schemas import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    OllamaShowRequest,
)
from openpto.serving.service import Completion, Service

router = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)], tags=["ollama"])

_NS = 1_000_000_000


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _params(service: Service, options: OllamaOptions | None, prompt_tokens: int) -> SamplingParams:
    o = options or OllamaOptions.model_validate({})
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
        "load_duration": 0,  # the model was loaded at start-up, not for this request
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
    service.check_model(body.model)
    _refuse(images=body.images, format=body.format, suffix=body.suffix, template=body.template)
    if not body.prompt and not body.context:
        return _loaded(service, {"response": ""})
    if body.raw:
        prompt = body.prompt
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        prompt = service.engine.chat_prompt([*messages, {"role": "user", "content": body.prompt}])
    context = service.check_token_ids(body.context, "context") if body.context else []
    ids = context + (service.prompt_ids(prompt) if body.prompt else [])
    stream = service.start(ids, _params(service, body.options, len(ids)))
    return await _respond(service, request, stream, streaming=body.stream, prompt=prompt,
                          prompt_tokens=len(ids), piece=lambda text: {"response": text})


@router.post("/chat")
async def chat(body: OllamaChatRequest, request: Request, service: ServiceDep) -> Any:
    service.check_model(body.model)
    _refuse(images=any(m.images for m in body.messages))
    if not body.messages:
        return _loaded(service, {"message": {"role": "assistant", "content": ""}})
    plan = tool_plans.plan_request(service.engine, tools=body.tools, tool_choice=None,
                                   parallel=None, json_schema=_format_schema(body.format))
    if plan.parse_calls or any(m.role == "tool" or m.tool_calls for m in body.messages):
        prompt = service.engine.chat_prompt_with_tools(tool_plans.conversation(body.messages),
                                                       plan.tools)
    else:
        prompt = service.engine.chat_prompt([{"role": m.role, "content": m.content}
                                             for m in body.messages])
    ids = service.prompt_ids(prompt)
    params = _params(service, body.options, len(ids))
    if plan.grammar is not None:
        masks = await tool_plans.constraints(service.engine, plan, 1)
        stream = service.start_constrained(ids, params, masks)[0]
    else:
        stream = service.start(ids, params)
    if plan.parse_calls:
        return await _respond_with_tools(service, request, stream, plan, streaming=body.stream,
                                         prompt=prompt, prompt_tokens=len(ids))
    return await _respond(service, request, stream, streaming=body.stream, prompt=prompt,
                          prompt_tokens=len(ids),
                          piece=lambda text: {"message": {"role": "assistant", "content": text}})


def _format_schema(fmt: str | dict[str, Any] | None) -> Any:
    if not fmt:
        return None
    if fmt == "json":
        return {"type": "object"}
    if isinstance(fmt, str):
        raise APIError(400, f"format must be 'json' or a JSON Schema, got {fmt!r}")
    return tool_plans.check_schema(fmt, "format")


def _ollama_message(plan: tool_plans.ToolPlan, text: str) -> dict[str, Any]:
    parsed = tool_plans.parse(plan, text)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = [c.to_ollama() for c in parsed.tool_calls]
    if parsed.errors:
        message["tool_call_errors"] = [e.to_dict() for e in parsed.errors]
    return message


async def _respond_with_tools(service: Service, request: Request, stream: RequestStream,
                              plan: tool_plans.ToolPlan, *, streaming: bool, prompt: str,
                              prompt_tokens: int) -> Any:
    """``_respond`` for a reply that may call tools: text streams until a ``<tool_call>`` may
    begin; the calls come in one message record just before the final one."""
    base = {"model": service.model_id}
    if not streaming:
        done = await service.collect(stream, request)
        await service.log_prompt(prompt, done)
        return {**base, "created_at": _now(), "message": _ollama_message(plan, done.text),
                **_final(service, done, prompt_tokens)}

    def record(message: dict[str, Any]) -> str:
        return json.dumps({**base, "created_at": _now(), "message": message,
                           "done": False}) + "\n"

    async def lines() -> AsyncIterator[str]:
        splitter = ToolCallStream()
        parts: list[str] = []
        tokens = 0
        try:
            async for event in service.events(stream):
                tokens += event.tokens
                parts.append(event.text)
                shown = splitter.push(event.text) if event.text else ""
                if event.finish_reason is not None:
                    shown += splitter.finish()
                if shown:
                    yield record({"role": "assistant", "content": shown})
                if event.finish_reason is None:
                    continue
                if splitter.tail:
                    yield record(_ollama_message(plan, splitter.tail))
                done = Completion("".join(parts), event.finish_reason, prompt_tokens, tokens,
                                  event)
                yield json.dumps({**base, "created_at": _now(),
                                  "message": {"role": "assistant", "content": ""},
                                  **_final(service, done, prompt_tokens)}) + "\n"
                await service.log_prompt(prompt, done)
        except APIError as exc:  # headers are sent: report in-band, as Ollama does
            yield json.dumps({"error": exc.message}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _details(service: Service) -> dict[str, Any]:
    info = service.engine.info
    return {"parent_model": "", "format": info.format, "family": info.family,
            "families": [info.family], "parameter_size": _human(info.parameter_count),
            "quantization_level": info.quantization}


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _modified(service: Service) -> str:
    created = datetime.datetime.fromtimestamp(service.engine.info.created, datetime.timezone.utc)
    return created.isoformat().replace("+00:00", "Z")


@router.get("/tags")
async def tags(service: ServiceDep) -> Any:
    info = service.engine.info
    return {"models": [{"name": service.model_id, "model": service.model_id,
                        "modified_at": _modified(service), "size": info.size_bytes,
                        "digest": info.digest, "details": _details(service)}]}


@router.post("/show")
async def show(body: OllamaShowRequest, service: ServiceDep) -> Any:
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required")
    service.check_model(name)
    info = service.engine.info
    return {
        "modelfile": f"# served by openpto ({info.backend} backend)\nFROM {info.path}\n",
        "parameters": "",
        "template": info.chat_template,
        "details": _details(service),
        "model_info": {
            "general.architecture": info.family,
            "general.parameter_count": info.parameter_count,
            f"{info.family}.context_length": info.context_length,
            f"{info.family}.embedding_length": info.embedding_length,
        },
        "capabilities": ["completion", "embedding", "tools"],
        "modified_at": _modified(service),
    }


@router.get("/version")
async def version() -> Any:
    return {"version": __version__}


@router.get("/ps")
async def ps(service: ServiceDep) -> Any:
    if not service.engine.ready:
        return {"models": []}
    info = service.engine.info
    # Ollama unloads idle models after keep_alive; this server keeps its one model until it stops.
    never = datetime.datetime(9999, 12, 31, tzinfo=datetime.timezone.utc).isoformat()
    return {"models": [{"name": service.model_id, "model": service.model_id,
                        "size": info.size_bytes, "digest": info.digest,
                        "details": _details(service), "expires_at": never.replace("+00:00", "Z"),
                        "size_vram": 0, "context_length": info.context_length}]}


@router.post("/embed")
async def embed(body: OllamaEmbedRequest, service: ServiceDep) -> Any:
    service.check_model(body.model)
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
            "total_duration": int((time.perf_counter() - started) * _NS), "load_duration": 0,
            "prompt_eval_count": result.tokens}


@router.post("/embeddings")
async def embeddings(body: OllamaEmbeddingsRequest, service: ServiceDep) -> Any:
    service.check_model(body.model)
    result = await service.embed([body.prompt])
    return {"embedding": result.vectors[0]}
