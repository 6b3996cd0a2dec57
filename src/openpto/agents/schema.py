"""JSON Schemas for the agent's tools, built from what the library says about its configs.

``openpto.configs()`` lists every registered method config with its fields, declared types,
defaults and descriptions; the quantize and sparsify tools take a ``method`` (an enum of the
registered names of that kind) and a ``config`` object whose properties are the fields of those
methods. A method that a plugin registers is therefore in the schema the next time the tools are
built, with nothing in the agent changed. The workflow configs that are not registered
(``EvalConfig``, ``ProfileConfig``, ...) are plain dataclasses, described the same way through
``openpto.config.describe_config``.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

#: declared field type (as ``describe_config`` writes it) -> JSON Schema type
_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string",
               "None": "null", "Path": "string"}


def field_schema(type_text: str, help_text: str = "", default: Any = None) -> dict[str, Any]:
    """The schema of one field from its declared type, e.g. ``int | str | None`` ->
    ``{"type": ["integer", "string", "null"]}``; ``'a' | 'b'`` (a Literal) -> an enum; a type
    JSON cannot carry (a TextSource, say) is left out of the union."""
    parts = [p.strip() for p in type_text.split(" | ") if p.strip()]
    schema: dict[str, Any] = {}
    literals = [_literal(p) for p in parts]
    if parts and all(value is not _NOT_LITERAL for value in literals):
        schema["enum"] = literals
    else:
        # A part JSON cannot carry (a TextSource object, say) is left out: a tool call can
        # only pass the others. With none left, the field is unconstrained but described.
        types = ["array" if p.startswith("tuple[") else _JSON_TYPES[p] for p in parts
                 if p in _JSON_TYPES or p.startswith("tuple[")]
        if types:
            unique = list(dict.fromkeys(types))
            schema["type"] = unique[0] if len(unique) == 1 else unique
    description = help_text.strip()
    if default is not None:
        description = f"{description} (default {default!r})" if description else \
            f"default {default!r}"
    if description:
        schema["description"] = description
    return schema


_NOT_LITERAL = object()


def _literal(text: str) -> Any:
    if not (text[:1] in "'\"" or text.lstrip("-").isdigit()):
        return _NOT_LITERAL
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return _NOT_LITERAL


def method_choices(kind: str) -> list[dict[str, Any]]:
    """The registered method configs of ``kind`` (``quantization`` or ``sparsity``)."""
    import openpto

    return [c for c in openpto.configs() if c["kind"] == kind]


def method_schema(kind: str) -> dict[str, Any]:
    """``{"method": enum of the registered names, "config": their fields}`` for ``kind``.

    A field several methods share is one property; its description says which methods take it
    and each one's default when they differ."""
    methods = method_choices(kind)
    fields: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for method in methods:
        for f in method["fields"]:
            fields.setdefault(f["name"], []).append((method["name"], f))
    properties: dict[str, Any] = {}
    for name, owners in fields.items():
        first = owners[0][1]
        defaults = {repr(f["default"]) for _, f in owners}
        shared_default = first["default"] if len(defaults) == 1 else None
        schema = field_schema(first["type"], first["help"], shared_default)
        if len(defaults) > 1:
            per_method = ", ".join(f"{m}: {f['default']!r}" for m, f in owners)
            schema["description"] = f"{schema.get('description', '')} (defaults {per_method})"
        if len(owners) < len(methods):
            schema["description"] = (f"{schema.get('description', '')} "
                                     f"[{', '.join(m for m, _ in owners)} only]").strip()
        properties[name] = schema
    listing = "; ".join(f"{m['name']}: {m['description']}" for m in methods)
    return {
        "method": {"type": "string", "enum": [m["name"] for m in methods],
                   "description": f"the {kind} method ({listing})"},
        "config": {"type": "object", "properties": properties, "additionalProperties": False,
                   "description": f"fields of the method's config; leave out a field to keep "
                                  f"its default ({kind} methods' fields)"},
    }


def dataclass_properties(cls: type, helps: dict[str, str],
                         skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Properties for the fields of a workflow dataclass (``EvalConfig``, ``ProfileConfig``);
    ``helps`` supplies descriptions for fields that carry none in their metadata."""
    from openpto.config import describe_config

    properties = {}
    for info in describe_config(cls):
        if info.name in skip:
            continue
        properties[info.name] = field_schema(info.type, info.help or helps.get(info.name, ""),
                                             info.default)
    return properties


def object_schema(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
