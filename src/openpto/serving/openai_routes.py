"""OpenAI-compatible routes: chat and text completions (SSE streaming), models, embeddings.

``n`` > 1 is supported: each choice runs as its own sequence in the batch (with a seed, choice i
uses seed + i). Chat takes ``tools``, ``tool_choice``, ``parallel_tool_calls`` and
``response_format`` (``serving.tools``; streamed calls come as one delta each, after the text
before them). Not supported, refused with a 400 naming the field: logprobs, images,
frequency/presence penalties other than 0, ``suffix``, ``best_of`` > ``n``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from openpto.core.sampling import SamplingParams
from openpto.engines.streams import RequestStream
from openpto.engines.tool_calls import ToolCallStream
from openpto.serving import tools as tool_plans
from openpto.serving.deps import ServiceDep, require_api_key
from openpto.serving.errors import APIError
from openpto.serving.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)
from openpto.serving.service import Completion, Service

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    checks: list[tuple[bool, str, str]] = [
        (bool(body.logprobs), "logprobs are not supported", "logprobs"),
        (bool(body.frequency_penalty), "frequency_penalty is not supported (use "
         "repetition_penalty)", "frequency_penalty"),
        (bool(body.presence_penalty), "presence_penalty is not supported (use "
         "repetition_penalty)", "presence_penalty"),
    ]
    if not isinstance(body, ChatCompletionRequest):
        checks += [
            (body.suffix is not None, "suffix (fill-in-the-middle) is not supported", "suffix"),
            (body.best_of is not None and body.best_of > body.n,
             "best_of > n is not supported", "best_of"),
        ]
    for failed, message, param in checks:
        if failed:
            raise APIError(400, message, "unsupported_parameter", param)


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text":
            raise APIError(400, f"content parts of type {part.type!r} are not supported",
                           "unsupported_content", "messages")
        texts.append(part.text or "")
    return "".join(texts)


def _params(service: Service, body: ChatCompletionRequest | CompletionRequest,
            max_tokens: int | None, prompt_tokens: int) -> SamplingParams:
    return service.sampling(
        max_tokens=max_tokens, prompt_tokens=prompt_tokens, temperature=body.temperature,
        top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, stop=body.stop, seed=body.seed,
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(
    service: Service, streams: list[RequestStream], *, first: list[dict[str, Any]],
    choice: Any, envelope: dict[str, Any], prompt_tokens: int, include_usage: bool,
    log: tuple[str, str] | None,
) -> AsyncIterator[str]:
    """SSE: ``first`` chunks, a chunk per text delta, one per finish, usage, ``[DONE]``."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data = {**envelope, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return _sse(data)

    counts = [0] * len(streams)
    texts = [""] * len(streams)
    try:
        for item in first:
            yield chunk([item])
        async for index, event in service.merged(streams):
            counts[index] += event.tokens
            texts[index] += event.text
            if event.text:
                yield chunk([choice(index, event.text, None)])
            if event.finish_reason is not None:
                yield chunk([choice(index, None, event.finish_reason)])
                if log is not None and index == 0:
                    done = Completion(texts[0], event.finish_reason, prompt_tokens, counts[0],
                                      event)
                    await service.log_prompt(log[0], done, log[1])
        if include_usage:
            yield chunk([], _usage(prompt_tokens, sum(counts)))
    except APIError as exc:  # the status line is gone; report the error in-band, as OpenAI does
        yield _sse({"error": {"message": exc.message, "type": "server_error", "code": exc.code}})
    yield _sse("[DONE]")


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           service: ServiceDep) -> Any:
    service.check_model(body.model)
    _refuse_unsupported(body)
    plan = tool_plans.plan_request(
        service.engine, tools=body.tools, tool_choice=body.tool_choice,
        parallel=body.parallel_tool_calls,
        json_schema=tool_plans.json_schema_of(body.response_format, "response_format"))
    prompt = _chat_prompt(service, body, plan)
    ids = service.prompt_ids(prompt)
    params = _params(service, body, body.max_completion_tokens or body.max_tokens, len(ids))
    if plan.grammar is not None:
        masks = await tool_plans.constraints(service.engine, plan, body.n)
        streams = service.start_constrained(ids, params, masks)
    else:
        streams = service.start_n(ids, params, body.n)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    envelope = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": service.model_id, "system_fingerprint": None}
    include = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream and plan.parse_calls:
        return StreamingResponse(
            _stream_tool_calls(service, streams, plan, envelope=envelope,
                               prompt_tokens=len(ids), include_usage=include,
                               log=(prompt, request_id)),
            media_type="text/event-stream", headers=_SSE_HEADERS)
    if body.stream:
        def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(body.n)]
        return StreamingResponse(
            _stream(service, streams, first=first, choice=choice, envelope=envelope,
                    prompt_tokens=len(ids), include_usage=include,
                    log=(prompt, request_id)),
            media_type="text/event-stream", headers=_SSE_HEADERS)
    results = await _collect_all(service, streams, request)
    await service.log_prompt(prompt, results[0], request_id)
    choices = []
    for i, r in enumerate(results):
        message, called = tool_plans.openai_message(plan, r.text)
        choices.append({"index": i, "message": message, "logprobs": None,
                        "finish_reason": "tool_calls" if called else r.finish_reason})
    return {
        **envelope,
        "object": "chat.completion",
        "choices": choices,
        "usage": _usage(len(ids), sum(r.completion_tokens for r in results)),
    }


def _chat_prompt(service: Service, body: ChatCompletionRequest,
                 plan: tool_plans.ToolPlan) -> str:
    """Through the plain chat template, unless tools, calls or tool results are involved."""
    uses_tools = plan.parse_calls or any(m.role == "tool" or m.tool_calls
                                         for m in body.messages)
    if not uses_tools:
        return service.engine.chat_prompt(
            [{"role": "system" if m.role == "developer" else m.role,
              "content": _message_text(m)} for m in body.messages])
    messages = tool_plans.conversation(body.messages)
    for message, original in zip(messages, body.messages, strict=True):
        message["content"] = _message_text(original)
    return service.engine.chat_prompt_with_tools(messages,
                                                 plan.tools if plan.parse_calls else [])


async def _stream_tool_calls(
    service: Service, streams: list[RequestStream], plan: tool_plans.ToolPlan, *,
    envelope: dict[str, Any], prompt_tokens: int, include_usage: bool, log: tuple[str, str],
) -> AsyncIterator[str]:
    """SSE of a reply that may call tools: text as it comes (a tail that may open a
    ``<tool_call>`` is held back), then each parsed call as one delta, then the finish."""

    def chunk(index: int | None, delta: dict[str, Any] | None = None,
              finish: str | None = None, usage: dict[str, int] | None = None) -> str:
        choices = [] if index is None else [{"index": index, "delta": delta or {},
                                             "logprobs": None, "finish_reason": finish}]
        data = {**envelope, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return _sse(data)

    splitters = [ToolCallStream() for _ in streams]
    counts = [0] * len(streams)
    texts = [""] * len(streams)
    try:
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for index, event in service.merged(streams):
            counts[index] += event.tokens
            texts[index] += event.text
            shown = splitters[index].push(event.text) if event.text else ""
            if event.finish_reason is None:
                if shown:
                    yield chunk(index, {"content": shown})
                continue
            shown += splitters[index].finish()
            if shown:
                yield chunk(index, {"content": shown})
            parsed = tool_plans.parse(plan, splitters[index].tail)
            for k, call in enumerate(parsed.tool_calls):
                yield chunk(index, {"tool_calls": [{"index": k, **call.to_openai()}]})
            if parsed.content:
                yield chunk(index, {"content": parsed.content})
            finish = "tool_calls" if parsed.tool_calls else event.finish_reason
            errors = {"tool_call_errors": [e.to_dict() for e in parsed.errors]}
            yield chunk(index, errors if parsed.errors else {}, finish)
            if index == 0:
                done = Completion(texts[0], event.finish_reason, prompt_tokens, counts[0], event)
                await service.log_prompt(log[0], done, log[1])
        if include_usage:
            yield chunk(None, usage=_usage(prompt_tokens, sum(counts)))
    except APIError as exc:  # the status line is gone; report the error in-band, as OpenAI does
        yield _sse({"error": {"message": exc.message, "type": "server_error", "code": exc.code}})
    yield _sse("[DONE]")


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Any:
    service.check_model(body.model)
    _refuse_unsupported(body)
    prompts = _prompts(body.prompt)
    if body.echo and not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "echo needs text prompts, not token ids", None, "echo")
    prompt_ids = [service.prompt_ids(p) if isinstance(p, str)
                  else service.check_token_ids(p, "prompt") for p in prompts]
    streams: list[RequestStream] = []
    for ids in prompt_ids:
        streams += service.start_n(ids, _params(service, body, body.max_tokens, len(ids)), body.n)
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    envelope = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": service.model_id, "system_fingerprint": None}
    echo = [p if body.echo and isinstance(p, str) else "" for p in prompts for _ in range(body.n)]
    if body.stream:
        def choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

        first = [choice(i, e, None) for i, e in enumerate(echo) if e]
        log = (prompts[0], request_id) if isinstance(prompts[0], str) else None
        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(service, streams, first=first, choice=choice, envelope=envelope,
                    prompt_tokens=prompt_tokens, include_usage=include, log=log),
            media_type="text/event-stream", headers=_SSE_HEADERS)
    results = await _collect_all(service, streams, request)
    if isinstance(prompts[0], str):
        await service.log_prompt(prompts[0], results[0], request_id)
    return {
        **envelope,
        "choices": [{"index": i, "text": echo[i] + r.text, "logprobs": None,
                     "finish_reason": r.finish_reason} for i, r in enumerate(results)],
        "usage": _usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    }


async def _collect_all(service: Service, streams: list[RequestStream],
                       request: Request) -> list[Completion]:
    """All choices; if one fails, the others stop generating too."""
    try:
        return await asyncio.gather(*(service.collect(s, request) for s in streams))
    except BaseException:
        for stream in streams:
            stream.cancel()
        raise


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", "empty_prompt", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


@router.get("/models")
async def list_models(service: ServiceDep) -> Any:
    return {"object": "list", "data": [_model_card(service)]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, service: ServiceDep) -> Any:
    service.check_model(model_id)
    return _model_card(service)


def _model_card(service: Service) -> dict[str, Any]:
    info = service.engine.info
    return {"id": service.model_id, "object": "model", "created": info.created,
            "owned_by": "openpto", "backend": info.backend, "context_length": info.context_length}


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, service: ServiceDep) -> Any:
    service.check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or not all(isinstance(t, str) for t in texts):
        raise APIError(400, "input must be a string or a list of strings (token ids are not "
                            "supported)", "unsupported_input", "input")
    width = service.engine.info.embedding_length
    if body.dimensions is not None and body.dimensions != width:
        raise APIError(400, f"this model's embeddings have {width} dimensions; dimensions="
                            f"{body.dimensions} is not supported", None, "dimensions")
    result = await service.embed([str(t) for t in texts])
    data = []
    for index, vector in enumerate(result.vectors):
        value: Any = vector
        if body.encoding_format == "base64":
            import numpy as np

            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"object": "list", "data": data, "model": service.model_id,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}
