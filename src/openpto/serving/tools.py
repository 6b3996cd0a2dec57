"""Tool calling and structured output for the chat routes of both API families.

A request's ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format`` (or
Ollama's ``format``) become a ``ToolPlan``: the tools to render into the prompt, the grammar to
decode under (``engines.grammar``) and whether the reply is parsed for calls
(``engines.tool_calls.parse_reply``).

- ``tool_choice`` ``"none"``: tools are neither rendered nor parsed. ``"auto"`` (the default
  with tools): rendered, parsed, and decoded under the text-or-calls grammar where the backend
  can mask and the ``grammar`` extra is installed (otherwise freely: nothing to refuse).
  ``"required"`` or a named function: decoded under a grammar that forces a call, so it always
  parses; a backend that cannot mask or a missing extra is a 400 that says so.
- ``parallel_tool_calls``: several calls in one reply only when the client sends ``true``; left
  out, a reply holds one call (a small model offered more repeats its call until the token
  budget runs out). Identical calls repeated within one reply are kept once.
- ``response_format`` ``json_object``/``json_schema``: decoded under the schema's grammar (the
  same 400s). Together with tools that may be called it is refused: one grammar per reply.

A reply whose calls fail to parse is never an error: the text stays in ``content`` and each
failure is listed in the message's ``tool_call_errors`` (``type``: ``malformed_json``,
``unknown_tool``, ``invalid_arguments`` or ``unterminated``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from openpto.core.sampling import TokenConstraint
from openpto.engines.tool_calls import ParsedReply, Tool, find_tool, parse_reply, parse_tools
from openpto.errors import MissingDependency, OptError, UsageError
from openpto.serving.errors import APIError


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    tools: list[Tool] = dataclasses.field(default_factory=list)
    choice: str = "none"  # "none", "auto", "required" or a tool's name
    parallel: bool = True
    grammar: str | None = None

    @property
    def parse_calls(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def _choice(tool_choice: Any, tools: list[Tool]) -> str:
    name: Any
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a function, "
                                f"got {tool_choice!r}", "invalid_tool_choice", "tool_choice")
        name = tool_choice
    elif isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
        if not isinstance(name, str):
            raise APIError(400, "tool_choice names no function ({'type': 'function', "
                                "'function': {'name': ...}})", "invalid_tool_choice",
                           "tool_choice")
        try:
            find_tool(tools, name)
        except UsageError as exc:
            raise APIError(400, str(exc), "unknown_tool", "tool_choice") from exc
    else:
        raise APIError(400, "tool_choice must be a string or an object", "invalid_tool_choice",
                       "tool_choice")
    if name in ("required",) and not tools:
        raise APIError(400, "tool_choice 'required' needs tools", "invalid_tool_choice",
                       "tool_choice")
    return name


def json_schema_of(response_format: Mapping[str, Any] | None, param: str) -> Any:
    """The schema a JSON reply must match: None for text, any object for
    ``json_object``, the given one for ``json_schema`` (checked as JSON Schema)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object, "
                            "json_schema)", "unsupported_parameter", param)
    spec = (response_format or {}).get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if schema is None:
        schema = {"type": "object"}
    return check_schema(schema, param)


def check_schema(schema: Any, param: str) -> Mapping[str, Any]:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, Mapping):
        raise APIError(400, f"{param}: the schema must be a JSON object", "invalid_schema", param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise APIError(400, f"{param}: not a valid JSON Schema: {exc.message}", "invalid_schema",
                       param) from exc
    return schema


def plan_request(engine: Any, *, tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any,
                 parallel: bool | None, json_schema: Any) -> ToolPlan:
    """The plan of one chat request; every refusal is a 400 naming its field."""
    from openpto.engines.grammar import json_grammar, tool_call_grammar

    try:
        parsed = parse_tools(tools)
    except UsageError as exc:
        raise APIError(400, str(exc), "invalid_tool", "tools") from exc
    choice = _choice(tool_choice, parsed)
    plan = ToolPlan(parsed, choice, parallel is True)
    if json_schema is not None and plan.parse_calls:
        raise APIError(400, "a JSON response_format together with tools is not supported; "
                            "set tool_choice to 'none' or drop response_format",
                       "unsupported_parameter", "response_format")
    if json_schema is not None:
        return dataclasses.replace(plan, grammar=_needs_mask(engine, json_grammar(json_schema),
                                                            "response_format"))
    if not plan.parse_calls:
        return plan
    grammar = tool_call_grammar(parsed, choice, plan.parallel)
    if choice == "auto":
        # Without a mask, auto still works: the reply is parsed as it comes.
        return dataclasses.replace(plan, grammar=grammar if _can_mask(engine) else None)
    return dataclasses.replace(plan, grammar=_needs_mask(engine, grammar, "tool_choice"))


def _can_mask(engine: Any) -> bool:
    from openpto.engines.grammar import require_grammar_engine

    if not engine.supports_constraints:
        return False
    try:
        require_grammar_engine()
    except MissingDependency:
        return False
    return True


def _needs_mask(engine: Any, grammar: str, param: str) -> str:
    from openpto.engines.grammar import require_grammar_engine

    if not engine.supports_constraints:
        raise APIError(400, f"the {engine.backend} backend cannot constrain decoding, which "
                            f"this {param} needs; serve the model with --backend torch",
                       "constraints_unsupported", param)
    try:
        require_grammar_engine()
    except MissingDependency as exc:
        raise APIError(400, f"this {param} needs constrained decoding: {exc}",
                       "missing_dependency", param) from exc
    return grammar


async def constraints(engine: Any, plan: ToolPlan, n: int) -> list[TokenConstraint | None]:
    """One fresh matcher per choice (off the event loop: the first builds the tokenizer's)."""
    if plan.grammar is None:
        return [None] * n
    try:
        return [await asyncio.to_thread(engine.constraint, plan.grammar) for _ in range(n)]
    except OptError as exc:
        raise APIError(400, str(exc), "invalid_grammar") from exc


def parse(plan: ToolPlan, text: str) -> ParsedReply:
    """The reply's calls: the first unless ``parallel``, else each distinct one."""
    parsed = parse_reply(text, plan.tools)
    if not plan.parallel:
        return dataclasses.replace(parsed, tool_calls=parsed.tool_calls[:1])
    unique, seen = [], set()
    for call in parsed.tool_calls:
        if (call.name, call.arguments) not in seen:
            seen.add((call.name, call.arguments))
            unique.append(call)
    return dataclasses.replace(parsed, tool_calls=unique)


def openai_message(plan: ToolPlan, text: str) -> tuple[dict[str, Any], bool]:
    """The assistant message of a finished reply, and whether it carries calls."""
    if not plan.parse_calls:
        return {"role": "assistant", "content": text}, False
    parsed = parse(plan, text)
    message: dict[str, Any] = {"role": "assistant",
                               "content": parsed.content if parsed.content else None}
    if parsed.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
    elif not parsed.content:
        message["content"] = ""
    if parsed.errors:
        message["tool_call_errors"] = [e.to_dict() for e in parsed.errors]
    return message, bool(parsed.tool_calls)


def conversation(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Request messages (pydantic) as the plain dicts ``engines.tool_calls`` reads."""
    out = []
    for m in messages:
        item = {k: v for k, v in m.model_dump(exclude_none=True).items()
                if k in ("role", "content", "tool_calls", "tool_call_id", "name", "tool_name")}
        out.append(item)
    return out
