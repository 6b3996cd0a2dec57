"""Run the ``opt agent`` agent in-process: the programmatic async interface.

Front ends (the ``opt agent`` CLI, the TUI) call::

    from openpto.agents.runner import AgentSettings, run_agent

    result = await run_agent(
        "Which artifacts do I have?",
        AgentSettings(session="work", yes=False),
        confirm=ask_user,      # async (tool_name, arguments) -> bool
        on_event=show,         # (AgentEvent) -> None, called as things happen
    )
    print(result.output, result.run_id)

``AgentSettings``
    ``base_url``/``model``: the OpenAI-compatible endpoint and model name; None takes
    ``OPENAI_BASE_URL`` (with ``OPENAI_API_KEY``) when set, otherwise an ``opt serve`` of the
    default model started in-process on a free loopback port. ``session``: a conversation name
    to resume or start (stored in ``opt.db`` through the SDK's SQLite session); None starts a
    fresh one with a generated name. ``yes``: run tools that write or take long without asking.
    ``max_turns``: the most model turns in one run. ``trace``: send the SDK's trace to OpenAI,
    honoured only when the endpoint is api.openai.com. ``db_path``: the database (None: the
    usual ``opt.db``). ``tool_choice``: None/"auto", "required", "none" or a tool's name: that call
    is made first, then the tools are withdrawn so the model answers from its result (small
    models follow a forced choice far more reliably than they choose). ``tools``: offer only
    these (None: all; fewer tools make a much shorter prompt for a small model).
    ``max_tokens``: the most tokens of one model reply.

Events, passed to ``on_event`` on the event loop's thread as they happen:
    ``TextDelta(text)`` — a piece of the model's reply text;
    ``ToolCalled(call_id, name, arguments)`` — the model called a tool (arguments parsed);
    ``ToolFinished(call_id, name, output, ok)`` — the tool's result text, ``ok`` False when it
    failed or was refused.

``confirm(name, arguments)`` is awaited before a tool that writes or takes long (quantize,
sparsify, export, bench) unless ``settings.yes``; False runs nothing and tells the model so.

``AgentResult(output, tool_calls, session, run_id)``: the final text, the tool calls made (each
``name``, ``arguments``, ``ok``), the conversation's name and the ``runs`` row's id.

Two optional keywords: ``endpoint=`` an ``openpto.agents.endpoint.Endpoint`` already open (an
interactive loop opens one with ``open_endpoint`` and keeps the built-in server up across
prompts), ``sdk_model=`` an Agents SDK ``Model`` used instead of any endpoint (tests pass the
SDK's ``agents.testing.ScriptedModel``).

Each run is a ``runs`` row of kind ``agent`` (its config: the endpoint without the key, the
session, the tools) with a ``traces`` row per tool call, and a ``prompts`` row (source 'agent')
for the exchange; the conversation itself is in the SDK's session tables of the same database.
Errors that end a run (the endpoint unreachable, too many turns) raise ``AgentError``; a tool's
error is handed to the model as text and the run goes on.

The API key is read from the environment only (``OPENAI_API_KEY``) and never stored, logged,
printed or traced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openpto.agents.endpoint import Endpoint, open_endpoint
from openpto.agents.history import record_exchange
from openpto.agents.tools import ToolEnv, ToolSpec, build_tools, tool_output
from openpto.errors import AgentError, OptError, UsageError, require

INSTRUCTIONS = (
    "You are the assistant of openpto, a toolkit that makes open language models smaller and "
    "faster (quantization, pruning) and measures the cost (perplexity) and the gain (speed, "
    "memory). Use the tools to answer: call the one that does what the user asks, then answer "
    "briefly from its result. Report errors as they are. You have no tool to run shell "
    "commands, delete or move files, or change the database; say so if asked."
)


@dataclass(frozen=True)
class AgentSettings:
    base_url: str | None = None
    model: str | None = None
    session: str | None = None
    yes: bool = False
    max_turns: int = 10
    trace: bool = False
    db_path: Path | None = None
    #: None or "auto": the model decides; "required": some tool; "none": no tool; a tool's
    #: name: that call first, then the tools are withdrawn and the model answers
    tool_choice: str | None = None
    #: offer only these tools (None: all of them)
    tools: tuple[str, ...] | None = None
    #: the most tokens of one model reply (None: the endpoint's default; 512 on our own)
    max_tokens: int | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCalled:
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolFinished:
    call_id: str
    name: str
    output: str
    ok: bool


AgentEvent = TextDelta | ToolCalled | ToolFinished

Confirm = Callable[[str, dict[str, Any]], Awaitable[bool]]


@dataclass(frozen=True)
class AgentResult:
    output: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    session: str = ""
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "tool_calls": self.tool_calls,
                "session": self.session, "run_id": self.run_id}


def new_session_name() -> str:
    return "agent-" + uuid.uuid4().hex[:10]


async def run_agent(prompt: str, settings: AgentSettings, *, confirm: Confirm,
                    on_event: Callable[[AgentEvent], None], endpoint: Endpoint | None = None,
                    sdk_model: Any = None) -> AgentResult:
    """Run ``prompt`` to completion on the agent (see the module docstring)."""
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    if settings.max_turns < 1:
        raise UsageError(f"--max-turns must be at least 1, not {settings.max_turns}")
    require("agents", "agents", "opt agent")
    require("jsonschema", "agents", "checking the agent's tool arguments")
    chosen_tools(settings)  # a bad tool name fails before anything starts
    if sdk_model is not None or endpoint is not None:
        return await _run(prompt, settings, confirm, on_event, endpoint, sdk_model)
    async with opened_endpoint(settings) as opened:
        return await _run(prompt, settings, confirm, on_event, opened, None)


@contextlib.asynccontextmanager
async def opened_endpoint(settings: AgentSettings) -> AsyncIterator[Endpoint]:
    """The endpoint ``settings`` name, for the block: the built-in server is started (and
    stopped after) in a worker thread, since that loads a model."""
    with contextlib.ExitStack() as stack:
        endpoint = await asyncio.to_thread(stack.enter_context,
                                           open_endpoint(settings.base_url, settings.model))
        try:
            yield endpoint
        finally:
            await asyncio.to_thread(stack.pop_all().close)


class _ToolGate:
    """Runs the tool calls of one agent run: schema check, confirmation (one question at a
    time, even when the model calls tools in parallel), the library call in a worker thread,
    errors as text; and remembers how each call ended."""

    def __init__(self, env: ToolEnv, yes: bool, confirm: Confirm, recorder: Any) -> None:
        self.env, self.yes, self.confirm, self.recorder = env, yes, confirm, recorder
        self.ok: dict[str, bool] = {}
        self._asking = asyncio.Lock()

    async def call(self, spec: ToolSpec, call_id: str, raw: str) -> str:
        from openpto.store.db import now_iso

        started_at, start = now_iso(), time.perf_counter()
        attrs: dict[str, Any] = {"call_id": call_id, "arguments": raw}
        ok, text = False, ""
        try:
            ok, text = await self._call(spec, raw, attrs)
        finally:
            self.ok[call_id] = ok
            attrs.update(ok=ok, result=text[:500])
            self.recorder.trace_row(f"tool {spec.name}", started_at,
                                    (time.perf_counter() - start) * 1000.0, attrs)
        return text

    async def _call(self, spec: ToolSpec, raw: str, attrs: dict[str, Any]) -> tuple[bool, str]:
        try:
            arguments = parse_arguments(spec, raw)
        except UsageError as exc:
            return False, f"error: {exc}"
        if spec.confirm and not self.yes:
            async with self._asking:
                approved = await self.confirm(spec.name, arguments)
            attrs["confirmed"] = approved
            if not approved:
                return False, ("not run: the user declined this call, so nothing was done. "
                               "Do not retry it unless the user asks.")
        try:
            data = await asyncio.to_thread(spec.run, dict(arguments), self.env)
        except OptError as exc:
            return False, f"error: {exc}"
        except Exception as exc:
            # Not a user error but a fault: the model and the user both learn what failed, the
            # conversation survives, and the traces row keeps the reason.
            return False, f"error: {type(exc).__name__}: {exc}"
        return True, tool_output(data)


def parse_arguments(spec: ToolSpec, raw: str) -> dict[str, Any]:
    """The call's arguments, checked against the tool's schema; ``UsageError`` saying what is
    wrong otherwise. A null where the schema takes none means "the default" (small models send
    them for options they do not mean to set)."""
    import jsonschema

    try:
        arguments = json.loads(raw or "{}")
    except json.JSONDecodeError as exc:
        raise UsageError(f"the arguments of {spec.name} are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise UsageError(f"the arguments of {spec.name} must be a JSON object")
    arguments = _drop_refused_nulls(arguments, spec.parameters)
    errors = sorted(jsonschema.Draft202012Validator(spec.parameters).iter_errors(arguments),
                    key=lambda e: list(e.absolute_path))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path) or "arguments"
        raise UsageError(f"{spec.name}: {where}: {errors[0].message}")
    return arguments


def _drop_refused_nulls(values: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    properties = schema.get("properties", {})
    kept = {}
    for key, value in values.items():
        prop = properties.get(key, {})
        types = prop.get("type")
        allows_null = types == "null" or (isinstance(types, list) and "null" in types) or \
            None in prop.get("enum", ()) or (not types and "enum" not in prop)
        if value is None and not allows_null:
            continue
        if isinstance(value, dict) and prop.get("type") == "object":
            value = _drop_refused_nulls(value, prop)
        kept[key] = value
    return kept


def sdk_tools(specs: list[ToolSpec], gate: _ToolGate, forced: bool = False) -> list[Any]:
    """The specs as SDK function tools. ``forced`` (a tool named by ``tool_choice``): once
    that call has run, the tools are withdrawn, so the next turn answers from its result
    instead of calling again (a small model under ``auto`` often would)."""
    from agents import FunctionTool

    def invoker(spec: ToolSpec) -> Callable[[Any, str], Awaitable[str]]:
        async def invoke(context: Any, raw: str) -> str:
            return await gate.call(spec, context.tool_call_id, raw)
        return invoke

    def enabled(context: Any, agent: Any) -> bool:
        return not (forced and gate.ok)

    # Not strict: strict mode would make every optional field required (OpenAI's rule).
    return [FunctionTool(name=s.name, description=s.description,
                         params_json_schema=s.parameters, on_invoke_tool=invoker(s),
                         strict_json_schema=False, is_enabled=enabled) for s in specs]


def _sdk_model(endpoint: Endpoint) -> Any:
    from agents import OpenAIChatCompletionsModel
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=1)
    return OpenAIChatCompletionsModel(model=endpoint.model, openai_client=client)


async def _run(prompt: str, settings: AgentSettings, confirm: Confirm,
               on_event: Callable[[AgentEvent], None], endpoint: Endpoint | None,
               sdk_model: Any) -> AgentResult:
    from agents import Agent, ModelSettings, RunConfig, set_tracing_disabled
    from agents.memory import SQLiteSession

    from openpto.store import RunRecorder, Store, default_db_path

    tracing = tracing_allowed(endpoint, settings.trace)
    # Off globally too: the SDK would otherwise export traces of its own to OpenAI.
    set_tracing_disabled(not tracing)
    db_path = settings.db_path or default_db_path()
    store = Store(db_path)  # migrated: the session tables exist with the SDK's schema
    session_name = settings.session or new_session_name()
    specs = chosen_tools(settings)
    if endpoint is not None:
        model, model_name, described = _sdk_model(endpoint), endpoint.model, endpoint.describe()
    else:
        model, model_name = sdk_model, str(getattr(sdk_model, "model", type(sdk_model).__name__))
        described = {"model": model_name, "given": type(sdk_model).__name__}
    config = {"endpoint": described, "session": session_name, "max_turns": settings.max_turns,
              "yes": settings.yes, "trace": tracing, "tools": [s.name for s in specs]}
    recorder = RunRecorder(store, "agent", model_name, config)
    gate = _ToolGate(ToolEnv(settings.db_path), settings.yes, confirm, recorder)
    # Our small default model rambles at a non-zero temperature and within a long budget, and
    # does better with one call at a time.
    # include_usage: the streamed reply ends with its token counts (for the prompts row).
    model_settings = ModelSettings(include_usage=True)
    if endpoint is not None and endpoint.builtin:
        model_settings = model_settings.resolve(ModelSettings(
            temperature=0.0, max_tokens=512, parallel_tool_calls=False))
    if settings.max_tokens is not None:
        model_settings = model_settings.resolve(ModelSettings(max_tokens=settings.max_tokens))
    forced = settings.tool_choice not in (None, "auto", "required", "none")
    if settings.tool_choice is not None:
        model_settings = model_settings.resolve(ModelSettings(tool_choice=settings.tool_choice))
    agent = Agent(name="openpto", instructions=INSTRUCTIONS,
                  tools=sdk_tools(specs, gate, forced),
                  model=model, model_settings=model_settings)
    run_config = RunConfig(tracing_disabled=not tracing, trace_include_sensitive_data=False,
                           workflow_name="opt agent",
                           tool_not_found_behavior="return_error_to_model")
    session = SQLiteSession(session_name, db_path)
    started = time.perf_counter()
    recorder.start()
    try:
        output, calls, usage = await _stream(agent, prompt, session, settings.max_turns,
                                             run_config, gate, on_event)
        record_exchange(store, session=session_name, model=model_name, prompt=prompt,
                        response=output, tokens_in=usage.input_tokens or None,
                        tokens_out=usage.output_tokens or None,
                        duration_ms=(time.perf_counter() - started) * 1000.0, run_id=recorder.id)
    except BaseException as exc:
        recorder.finish(exc)
        raise
    finally:
        session.close()
    recorder.finish()
    return AgentResult(output, calls, session_name, recorder.id)


async def _stream(agent: Any, prompt: str, session: Any, max_turns: int, run_config: Any,
                  gate: _ToolGate, on_event: Callable[[AgentEvent], None]
                  ) -> tuple[str, list[dict[str, Any]], Any]:
    """Run the agent streamed, turning the SDK's events into ours as they come."""
    import openai
    from agents import AgentsException, MaxTurnsExceeded, Runner

    # A list, and the latest call of each id: some endpoints reuse ids from turn to turn.
    calls: list[dict[str, Any]] = []
    latest: dict[str, dict[str, Any]] = {}
    try:
        result = Runner.run_streamed(agent, prompt, session=session, max_turns=max_turns,
                                     run_config=run_config)
        async for event in result.stream_events():
            if event.type == "raw_response_event":
                if event.data.type == "response.output_text.delta" and event.data.delta:
                    on_event(TextDelta(event.data.delta))
            elif event.type == "run_item_stream_event":
                if event.name == "tool_called":
                    call_id, name, arguments = _call_of(event.item.raw_item)
                    latest[call_id] = {"name": name, "arguments": arguments, "ok": False}
                    calls.append(latest[call_id])
                    on_event(ToolCalled(call_id, name, arguments))
                elif event.name == "tool_output":
                    call_id = str(_field(event.item.raw_item, "call_id"))
                    ok = gate.ok.get(call_id, False)  # absent: a tool the agent does not have
                    call = latest.get(call_id, {"name": ""})
                    call["ok"] = ok
                    on_event(ToolFinished(call_id, call["name"], str(event.item.output), ok))
    except MaxTurnsExceeded:
        raise AgentError(f"the agent gave no final answer within {max_turns} turns "
                         "(--max-turns)") from None
    except openai.APIConnectionError as exc:
        raise AgentError(f"cannot reach the model endpoint: {exc}") from None
    except openai.APIStatusError as exc:
        raise AgentError(f"the model endpoint answered {exc.status_code}: "
                         f"{_api_message(exc)}") from None
    except AgentsException as exc:
        raise AgentError(f"the agent could not go on: {exc}") from None
    output = result.final_output
    text = output if isinstance(output, str) else json.dumps(output, default=str)
    return text, calls, result.context_wrapper.usage


def tracing_allowed(endpoint: Endpoint | None, trace: bool) -> bool:
    """Traces go to OpenAI only: when the endpoint is OpenAI's and ``--trace`` asks for them."""
    return endpoint is not None and endpoint.is_openai and trace


def chosen_tools(settings: AgentSettings) -> list[ToolSpec]:
    """The tools ``settings`` offer, built now; ``UsageError`` for a name that is no tool, a
    forced choice outside them, or a bad number."""
    specs = build_tools()
    names = [s.name for s in specs]
    if settings.tools is not None:
        unknown = [n for n in settings.tools if n not in names]
        if unknown or not settings.tools:
            raise UsageError(f"--tools: {', '.join(unknown) or 'none given'} (tools: "
                             f"{', '.join(names)})")
        specs = [s for s in specs if s.name in settings.tools]
    allowed = ["auto", "required", "none", *(s.name for s in specs)]
    if settings.tool_choice is not None and settings.tool_choice not in allowed:
        raise UsageError(f"--tool-choice {settings.tool_choice!r} is none of: "
                         f"{', '.join(allowed)}")
    if settings.max_tokens is not None and settings.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, not {settings.max_tokens}")
    return specs


def _field(raw: Any, name: str) -> Any:
    return raw.get(name) if isinstance(raw, dict) else getattr(raw, name, None)


def _call_of(raw: Any) -> tuple[str, str, dict[str, Any]]:
    text = _field(raw, "arguments") or "{}"
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:
        arguments = {"unparsed": text}
    if not isinstance(arguments, dict):
        arguments = {"unparsed": text}
    return str(_field(raw, "call_id")), str(_field(raw, "name")), arguments


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(getattr(exc, "message", exc))
