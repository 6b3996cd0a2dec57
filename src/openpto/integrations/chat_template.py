"""A tokenizer's Jinja chat template as Ollama's Go template, checked by rendering both.

Ollama formats chats with a Go template over ``.Messages``; it puts the model's default system
prompt (the Modelfile's ``SYSTEM``) first when a chat has no system message, which is what
templates such as SmolLM2's do in Jinja. ``convert`` recognises the template's style from its
markers (ChatML: ``<|im_start|>``/``<|im_end|>``; Llama-3: ``<|start_header_id|>``/
``<|eot_id|>``), takes that style's Go template and stop strings, reads the default system
prompt off a rendering, and then renders a set of conversations (system, multi-turn, tool
results, tool definitions) through both the Jinja template and the Go one (``gotemplate``, the
way Ollama fills it in) — the conversion holds only if every text is identical. A template of no
known style, or one whose renderings differ, is an ``UnconvertibleTemplate``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from openpto.errors import UsageError
from openpto.integrations.gotemplate import render


class UnconvertibleTemplate(UsageError):
    """A chat template that cannot be expressed as an Ollama template automatically."""


@dataclass(frozen=True)
class Style:
    name: str
    markers: tuple[str, ...]
    template: str
    stop: tuple[str, ...]
    system: re.Pattern[str]  # the default system prompt in a rendering of a user-only chat


STYLES = (
    Style(
        "chatml",
        ("<|im_start|>", "<|im_end|>"),
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
        re.compile(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.S),
    ),
    Style(
        "llama3",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        re.compile(r"^<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S),
    ),
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}

#: conversations the converted template must render exactly as the Jinja one
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "What is the capital of Italy?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "Count to two."},
     {"role": "assistant", "content": "One, two."},
     {"role": "user", "content": "And to three?"}],
    [{"role": "user", "content": "What is the weather in Paris?"},
     {"role": "assistant", "content": "Let me look."},
     {"role": "tool", "content": "{\"temperature\": 18, \"sky\": \"clear\"}"},
     {"role": "user", "content": "Thanks. Shorts or trousers?"}],
]


@dataclass(frozen=True)
class OllamaTemplate:
    style: str
    template: str
    stop: tuple[str, ...]
    system: str | None
    checked: int  # conversations rendered identically
    warnings: tuple[str, ...] = field(default=())


def detect_style(jinja: str) -> Style:
    for style in STYLES:
        if all(marker in jinja for marker in style.markers):
            return style
    raise UnconvertibleTemplate(
        "the chat template is neither ChatML (<|im_start|>) nor Llama-3 (<|start_header_id|>) "
        "style; write the TEMPLATE of the Modelfile by hand")


def jinja_text(tokenizer: Any, messages: list[dict[str, str]],
               tools: list[dict[str, Any]] | None = None) -> str:
    """The Jinja rendering as the model reads it from Ollama: without a leading BOS token, which
    llama.cpp adds itself when it tokenizes."""
    text = str(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=True))
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and not any(text.startswith(m) for s in STYLES
                                                  for m in s.markers):
        text = text[len(bos):]
    return text


def ollama_messages(messages: list[dict[str, str]], system: str | None) -> dict[str, Any]:
    """What Ollama hands its template: the default system message first when the chat has
    none, consecutive messages of one role joined (its ``collate``), ``.System`` the system
    messages' text."""
    chat = list(messages)
    if system and (not chat or chat[0]["role"] != "system"):
        chat.insert(0, {"role": "system", "content": system})
    collated: list[dict[str, Any]] = []
    for message in chat:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"],
                             "ToolCalls": None})
    systems = [m["Content"] for m in collated if m["Role"] == "system"]
    return {"Messages": collated, "System": "\n\n".join(systems), "Prompt": "",
            "Response": "", "Tools": None}


def go_text(template: str, messages: list[dict[str, str]], system: str | None,
            tools: list[dict[str, Any]] | None = None) -> str:
    data = ollama_messages(messages, system)
    data["Tools"] = tools
    return render(template, data)


def convert(tokenizer: Any) -> OllamaTemplate:
    """The Ollama template of ``tokenizer``'s chat template, checked (see the module doc)."""
    jinja = getattr(tokenizer, "chat_template", None)
    if not jinja or not isinstance(jinja, str):
        raise UnconvertibleTemplate("the tokenizer has no chat template to convert")
    style = detect_style(jinja)
    try:
        bare = jinja_text(tokenizer, CONVERSATIONS[0])
    except Exception as exc:  # a template's own raise_exception or a Jinja error
        raise UnconvertibleTemplate(f"the chat template does not render: {exc}") from exc
    found = style.system.match(bare)
    system = found.group(1) if found else None
    checked = 0
    for messages in CONVERSATIONS:
        want, got = _both(tokenizer, style, messages, system)
        if want != got:
            raise UnconvertibleTemplate(
                f"the {style.name} conversion renders {got!r} where the chat template renders "
                f"{want!r}; write the TEMPLATE of the Modelfile by hand")
        checked += 1
    warnings: list[str] = []
    want, got = _both(tokenizer, style, CONVERSATIONS[0], system, [WEATHER_TOOL])
    if want != got:
        warnings.append("the chat template describes tools in its own way, which the converted "
                        "template leaves out: tool definitions do not reach the model")
    else:
        checked += 1
    return OllamaTemplate(style.name, style.template, style.stop, system, checked,
                          tuple(warnings))


def _both(tokenizer: Any, style: Style, messages: list[dict[str, str]], system: str | None,
          tools: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    try:
        want = jinja_text(tokenizer, messages, tools)
    except Exception as exc:  # e.g. a template that refuses the tool role
        raise UnconvertibleTemplate(f"the chat template does not render {messages!r}: "
                                    f"{exc}") from exc
    return want, go_text(style.template, messages, system, tools)


# -- the Modelfile -----------------------------------------------------------------------------


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UsageError('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def modelfile(gguf: str, template: OllamaTemplate | None, license_text: str | None,
              problem: str = "", jinja: str = "") -> str:
    """The Modelfile that ``ollama create -f`` turns into the same model as the push."""
    lines = [f"FROM {gguf}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quoted(template.template)}")
        if template.system:
            lines.append(f"SYSTEM {_quoted(template.system)}")
        lines += [f'PARAMETER stop "{stop}"' for stop in template.stop]
    else:
        lines.append(f"# The chat template could not be converted: {problem}")
        lines.append('# Write TEMPLATE """…""" (Ollama\'s Go template), SYSTEM and PARAMETER stop')
        lines.append("# here; the tokenizer's Jinja chat template was:")
        lines += [f"#   {line}" for line in jinja.splitlines() or [""]]
    if license_text:
        lines.append(f"LICENSE {_quoted(license_text)}")
    return "\n".join(lines) + "\n"
