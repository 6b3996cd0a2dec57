"""Tool calling without HTTP: tools into the prompt, a completion back into text and calls.

Used by ``opt serve`` (both API families) and the in-process ``llm`` plugin. Everything here is
plain Python plus a Hugging Face tokenizer where one is given; nothing imports torch.

Public functions (all small, all documented below):

- ``parse_tools(tools)``: OpenAI/Ollama tool definitions -> ``Tool``s; a name that is missing or
  repeated, or ``parameters`` that are not valid JSON Schema, raise ``UsageError`` naming the tool.
- ``template_renders_tools(tokenizer)``: whether the model's chat template writes ``tools`` into
  the prompt (rendered once with a probe tool; the probe's name must appear in the text).
- ``chat_prompt(tokenizer, messages, tools)``: the prompt of a conversation with tools, through
  the template when it renders them, otherwise through ``plain_messages``.
- ``plain_messages(messages, tools)``: role/content messages any chat template can render: the
  Hermes-style system block (``tools_system_block``), assistant calls as ``<tool_call>`` lines,
  tool results as ``<tool_response>`` user messages.
- ``parse_reply(text, tools)``: a completion -> ``ParsedReply(content, tool_calls, errors)``.
- ``ToolCallStream``: streaming help: text before a ``<tool_call>`` tag comes out as it arrives;
  a tail that may be the start of the tag is held back until it cannot be.

The call format (the system block asks for it and the grammars of ``engines.grammar`` force it)::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

Messages are OpenAI-shaped dicts: ``role``, ``content``, and for assistants ``tool_calls``
(``[{"id", "type": "function", "function": {"name", "arguments"}}]``, arguments a JSON string or,
as Ollama sends them, an object); for tool results ``tool_call_id`` and/or ``name``/``tool_name``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from openpto.errors import UsageError

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_CALL = re.compile(re.escape(OPEN_TAG) + r"(.*?)(?:" + re.escape(CLOSE_TAG) + r"|\Z)", re.S)
_PROBE = "openpto_probe_tool_5b1e"

ErrorKind = Literal["malformed_json", "unknown_tool", "invalid_arguments", "unterminated"]


@dataclasses.dataclass(frozen=True)
class Tool:
    """One function the model may call; ``parameters`` is its arguments' JSON Schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A parsed call; ``arguments`` is JSON text (``"{}"`` when the model gave none)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def to_ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": json.loads(self.arguments)}}


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A ``<tool_call>`` block that could not become a call; ``text`` is the block as written."""

    kind: ErrorKind
    message: str
    text: str

    def to_dict(self) -> dict[str, str]:
        return {"type": self.kind, "message": self.message, "text": self.text}


@dataclasses.dataclass(frozen=True)
class ParsedReply:
    """``content``: the text outside the calls (failed blocks stay in it, verbatim, so nothing
    the model wrote is lost); ``tool_calls`` in order; ``errors`` one per failed block."""

    content: str
    tool_calls: list[ToolCall]
    errors: list[ToolCallError]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- tool definitions ------------------------------------------------------------------------------


def parse_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Tool]:
    """``[{"type": "function", "function": {"name", "description", "parameters"}}]`` (OpenAI and
    Ollama) or bare ``{"name", ...}`` entries -> ``Tool``s, each schema checked."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    parsed: list[Tool] = []
    for position, entry in enumerate(tools or []):
        if not isinstance(entry, Mapping):
            raise UsageError(f"tools[{position}] must be an object")
        kind = entry.get("type", "function")
        if kind != "function":
            raise UsageError(f"tools[{position}]: type {kind!r} is not supported (only function)")
        function = entry.get("function", entry)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise UsageError(f"tools[{position}]: a function needs a name of 1-64 letters, digits, "
                             f"'_', '.' or '-', got {name!r}")
        if any(t.name == name for t in parsed):
            raise UsageError(f"tool {name!r} is defined twice")
        assert isinstance(function, Mapping)
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise UsageError(f"tool {name!r}: parameters must be a JSON Schema object")
        try:
            Draft202012Validator.check_schema(parameters)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise UsageError(f"tool {name!r}: parameters is not a valid JSON Schema"
                             f"{' at ' + where if where else ''}: {exc.message}") from exc
        parsed.append(Tool(name, str(function.get("description") or ""), dict(parameters)))
    return parsed


def find_tool(tools: Sequence[Tool], name: str) -> Tool:
    for tool in tools:
        if tool.name == name:
            return tool
    known = ", ".join(t.name for t in tools) or "none"
    raise UsageError(f"tool_choice names {name!r}, which is not among the tools ({known})")


# -- prompts ------------------------------------------------------------------------------------


def tools_system_block(tools: Sequence[Tool]) -> str:
    """The Hermes-style instructions used when the chat template does not render tools."""
    listed = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
    return (
        "You are a function calling AI model. You may call one or more functions to assist with "
        "the user query. Function signatures are given within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a function, reply with a JSON object holding its name and arguments within "
        "<tool_call></tool_call> XML tags, one call per line:\n"
        '<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>\n'
        "If no function fits, answer in plain text."
    )


def _arguments_object(arguments: Any) -> Any:
    """Call arguments as an object where possible (OpenAI sends a JSON string)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return {} if arguments is None else arguments


def _calls_of(message: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """(id, name, arguments object) of an assistant message's ``tool_calls``."""
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        calls.append((str(call.get("id") or ""), str(function.get("name", "")),
                      _arguments_object(function.get("arguments"))))
    return calls


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def plain_messages(messages: Sequence[Mapping[str, Any]],
                   tools: Sequence[Tool] = ()) -> list[dict[str, str]]:
    """Role/content messages for templates that know nothing of tools (see the module docstring).

    The tools block opens the system message (one is added first if there is none); consecutive
    tool results become one user message of ``<tool_response>`` lines.
    """
    names: dict[str, str] = {}
    out: list[dict[str, str]] = []
    pending_results: list[str] = []

    def flush() -> None:
        if pending_results:
            out.append({"role": "user", "content": "\n".join(pending_results)})
            pending_results.clear()

    for message in messages:
        role = str(message.get("role", ""))
        if role == "tool":
            call_id = str(message.get("tool_call_id") or "")
            name = message.get("name") or message.get("tool_name") or names.get(call_id, "")
            result = json.dumps({"name": name, "content": _content(message)}, ensure_ascii=False)
            pending_results.append(f"<tool_response>{result}</tool_response>")
            continue
        flush()
        text = _content(message)
        if role == "assistant" and message.get("tool_calls"):
            lines = [text] if text else []
            for call_id, name, arguments in _calls_of(message):
                names[call_id] = name
                lines.append(OPEN_TAG + json.dumps({"name": name, "arguments": arguments},
                                                   ensure_ascii=False) + CLOSE_TAG)
            text = "\n".join(lines)
        out.append({"role": "system" if role == "developer" else role, "content": text})
    flush()
    if tools:
        block = tools_system_block(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


_RENDERS_TOOLS: dict[str, bool] = {}


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether ``tokenizer``'s chat template writes the ``tools`` it is given into the prompt.

    The answer is the template's, so it is worked out once per template text rather than with
    a probe rendering on every request that carries tools."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = str(template)
    if key not in _RENDERS_TOOLS:
        _RENDERS_TOOLS[key] = _probe_renders_tools(tokenizer)
    return _RENDERS_TOOLS[key]


def _probe_renders_tools(tokenizer: Any) -> bool:
    probe = Tool(_PROBE, "probe", {"type": "object", "properties": {}})
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                             tools=[probe.to_openai()], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # a template that cannot take tools (jinja error): the system block
        return False
    return _PROBE in str(text)


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages in the shape Hugging Face tool templates expect (arguments as objects)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = str(message.get("role", ""))
        item: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                "content": _content(message)}
        if role == "assistant" and message.get("tool_calls"):
            item["tool_calls"] = [{"id": i, "type": "function",
                                   "function": {"name": n, "arguments": a}}
                                  for i, n, a in _calls_of(message)]
        if role == "tool":
            item["tool_call_id"] = message.get("tool_call_id")
            if message.get("name") or message.get("tool_name"):
                item["name"] = message.get("name") or message.get("tool_name")
        out.append(item)
    return out


def chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Tool] = ()) -> str:
    """The prompt text (generation prompt appended) of a conversation that may use tools."""
    uses_tools = bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls")
                                    for m in messages)
    if uses_tools and template_renders_tools(tokenizer):
        return str(tokenizer.apply_chat_template(
            _template_messages(messages), tools=[t.to_openai() for t in tools] or None,
            tokenize=False, add_generation_prompt=True))
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this tokenizer has no chat template; use a raw prompt (--raw)")
    return str(tokenizer.apply_chat_template(plain_messages(messages, tools), tokenize=False,
                                             add_generation_prompt=True))


# -- replies ------------------------------------------------------------------------------------


def _check_call(block: str, raw: str, tools: Sequence[Tool]) -> ToolCall | ToolCallError:
    from jsonschema import Draft202012Validator

    try:
        data = json.loads(block)
    except json.JSONDecodeError as exc:
        return ToolCallError("malformed_json", f"the tool call is not valid JSON: {exc}", raw)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCallError("malformed_json", 'a tool call must be a JSON object with a "name"',
                             raw)
    name = data["name"]
    tool = next((t for t in tools if t.name == name), None)
    if tool is None:
        known = ", ".join(t.name for t in tools) or "none"
        return ToolCallError("unknown_tool", f"the model called {name!r}, which is not among "
                                             f"the tools ({known})", raw)
    arguments = data.get("arguments", data.get("parameters"))
    arguments = {} if arguments in (None, "") else _arguments_object(arguments)
    if not isinstance(arguments, dict):
        return ToolCallError("invalid_arguments", f"the arguments of {name!r} are not a JSON "
                                                  "object", raw)
    problem = next(iter(Draft202012Validator(tool.parameters).iter_errors(arguments)), None)
    if problem is not None:
        where = "/".join(str(p) for p in problem.absolute_path)
        return ToolCallError("invalid_arguments", f"the arguments of {name!r} do not match its "
                             f"schema{' at ' + where if where else ''}: {problem.message}", raw)
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


def parse_reply(text: str, tools: Sequence[Tool]) -> ParsedReply:
    """Split a completion into content and calls; each ``<tool_call>`` block is checked: JSON,
    a known tool name, arguments valid against the tool's schema (an unclosed block fails as
    ``unterminated``)."""
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    kept: list[str] = []
    position = 0
    for match in _CALL.finditer(text):
        kept.append(text[position:match.start()])
        position = match.end()
        block = match.group(1).strip()
        if not match.group(0).endswith(CLOSE_TAG):
            errors.append(ToolCallError("unterminated", "the tool call was cut off before "
                                        f"{CLOSE_TAG}", match.group(0)))
            kept.append(match.group(0))
            continue
        result = _check_call(block, match.group(0), tools)
        if isinstance(result, ToolCall):
            calls.append(result)
        else:
            errors.append(result)
            kept.append(match.group(0))
    kept.append(text[position:])
    return ParsedReply("".join(kept).strip() if calls else "".join(kept), calls, errors)


class ToolCallStream:
    """Text deltas in, content safe to show out; everything from the first ``<tool_call>`` on is
    held for ``parse_reply`` at the end (``tail``)."""

    def __init__(self) -> None:
        self._held = ""
        self._in_call = False
        self.tail = ""

    def push(self, delta: str) -> str:
        """The part of ``delta`` (plus anything held before) that is plain content."""
        if self._in_call:
            self.tail += delta
            return ""
        text = self._held + delta
        start = text.find(OPEN_TAG)
        if start >= 0:
            self._in_call, self._held, self.tail = True, "", text[start:]
            return text[:start]
        keep = _partial_tag_length(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        """Content still held back when the completion ends without a call."""
        held, self._held = self._held, ""
        return held


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``<tool_call>``."""
    for size in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if OPEN_TAG.startswith(text[-size:]):
            return size
    return 0
