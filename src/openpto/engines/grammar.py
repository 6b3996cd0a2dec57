"""Constrained decoding: grammars for tool calls and JSON replies, and their per-request masks.

The engine is llguidance (the ``grammar`` extra). On the default model's tokenizer (49,152
tokens) a mask costs it and xgrammar tens of microseconds per token (16 and 10 median,
``benchmarks/tool_calls.py``), under 1% of a decode step; llguidance's Lark grammars embed
JSON Schemas (``%json``) and lazy ``stop=`` rules, which the "text or a well-formed call"
grammar of ``tool_choice: auto`` needs, and it builds a matcher per request in under a
millisecond.

Grammar text (plain strings, no llguidance needed to build them):

- ``json_grammar(schema)``: a JSON value matching ``schema`` (``{"type": "object"}`` for
  ``response_format: json_object``).
- ``tool_call_grammar(tools, choice, parallel)``: ``choice`` ``"required"`` or a tool name forces
  one call (up to ``MAX_PARALLEL_CALLS`` with ``parallel``), each
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` with arguments valid against that
  tool's schema; ``"auto"`` allows plain text that never contains ``<tool_call>``, or text
  followed by well-formed calls.

JSON is forced into one canonical spacing (``", "`` and ``": "``, no newlines), and an object
schema that lists ``properties`` without saying ``additionalProperties`` gets no extra keys in
the grammar (as OpenAI's strict mode requires): a small model given free whitespace or free keys
can spend its whole budget on them. Parsing still validates against the schema as given.

``GrammarCompiler(tokenizer, vocab_size).constraint(grammar)`` returns a ``GrammarConstraint``,
the ``core.sampling.TokenConstraint`` the decoders call: ``mask_`` sets the logits of tokens the
grammar forbids to ``-inf`` (only the end-of-sequence token once the grammar is complete),
``accept`` advances the matcher.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from openpto.engines.tool_calls import CLOSE_TAG, OPEN_TAG, Tool
from openpto.errors import UsageError, require

#: calls one parallel reply may hold: a small model asked for calls can repeat them until its
#: token budget runs out, which would cut the last one off
MAX_PARALLEL_CALLS = 8
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def require_grammar_engine() -> Any:
    """llguidance, or ``MissingDependency`` naming ``pip install 'openpto[grammar]'``."""
    return require("llguidance", "grammar", "constrained decoding (tool calls, JSON replies)")


def _closed(schema: Any) -> Any:
    """A copy of ``schema`` whose objects with ``properties`` allow no other keys unless the
    schema says they may."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = ({k: _closed(v) for k, v in value.items()}
                        if isinstance(value, Mapping) else value)
        elif key in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "additionalProperties"):
            out[key] = _closed(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _with_compact_json(schema: Mapping[str, Any]) -> dict[str, Any]:
    out = _closed(schema)
    out["x-guidance"] = {**_COMPACT, **dict(schema.get("x-guidance") or {})}
    return out


def json_grammar(schema: Mapping[str, Any] | None = None) -> str:
    """Lark text for one JSON value matching ``schema`` (any object when None)."""
    body = _with_compact_json(schema if schema is not None else {"type": "object"})
    return f"start: %json {json.dumps(body)}\n"


def _call_schema(tool: Tool) -> dict[str, Any]:
    """``{"name": <const>, "arguments": <the tool's schema>}``; the tool's ``$defs`` move to the
    root so that its ``#/$defs/...`` references still resolve."""
    arguments = copy.deepcopy(dict(tool.parameters))
    root: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        if key in arguments:
            root[key] = arguments.pop(key)
    root.update({"type": "object", "properties": {"name": {"const": tool.name},
                                                  "arguments": arguments},
                 "required": ["name", "arguments"], "additionalProperties": False})
    return _with_compact_json(root)


def tool_call_grammar(tools: Sequence[Tool], choice: str = "required",
                      parallel: bool = True) -> str:
    """Lark text for ``tool_choice`` ``"auto"``, ``"required"`` or one tool's name."""
    if not tools:
        raise UsageError("a tool-call grammar needs at least one tool")
    chosen = list(tools) if choice in ("auto", "required") else [t for t in tools
                                                                   if t.name == choice]
    if not chosen:
        raise UsageError(f"tool_choice names {choice!r}, which is not among the tools")
    bodies = [f"body_{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(chosen)]
    alternatives = " | ".join(f"body_{i}" for i in range(len(chosen)))
    more = (f' ("\\n" "{OPEN_TAG}" call_body "{CLOSE_TAG}")~0..{MAX_PARALLEL_CALLS - 1}'
            if parallel else "")
    lines = [f"call_body: {alternatives}", *bodies]
    if choice == "auto":
        # Either text that never opens a call, or text up to the first tag and then calls only.
        lines += [f'start: PLAIN | prefix call_body "{CLOSE_TAG}"{more}',
                  f"PLAIN: /(?s:.*)/ & ~/(?s:.*{_regex_literal(OPEN_TAG)}.*)/",
                  f'prefix[stop="{OPEN_TAG}"]: /(?s:.*)/']
    else:
        lines += [f'start: "{OPEN_TAG}" call_body "{CLOSE_TAG}"{more}']
    return "\n".join(lines) + "\n"


def _regex_literal(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$*+?()[]{}|/" else c for c in text)


class GrammarCompiler:
    """Builds matchers for one tokenizer; the tokenizer's llguidance twin is made once (about
    half a second for a 49k vocabulary) on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    def _ll(self) -> Any:
        hf = require("llguidance.hf", "grammar", "constrained decoding")
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = hf.from_tokenizer(self.tokenizer,  # type: ignore[attr-defined]
                                                       n_vocab=self.vocab_size)
        return self._ll_tokenizer

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A fresh matcher for ``grammar`` (Lark text); a grammar it rejects is a UsageError."""
        llguidance = require_grammar_engine()
        tokenizer = self._ll()
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar),
                                       log_level=0)
        if matcher.is_error():
            raise UsageError(f"the grammar cannot be built: {matcher.get_error()}")
        return GrammarConstraint(matcher, tokenizer.vocab_size,
                                 int(getattr(self.tokenizer, "eos_token_id", 0) or 0))


class GrammarConstraint:
    """One request's matcher as a ``core.sampling.TokenConstraint``."""

    def __init__(self, matcher: Any, vocab_size: int, eos_id: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._bits = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """A boolean array over the grammar's vocabulary: which tokens may come next."""
        if self.matcher.is_error():  # never expected; end the request rather than run free
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[self.eos_id] = True
            return allowed
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def mask_(self, logits: torch.Tensor) -> None:
        allowed = torch.from_numpy(self.allowed()).to(logits.device)
        width = min(logits.shape[-1], allowed.shape[0])
        logits[..., width:] = float("-inf")  # rows of the model's padding beyond the vocabulary
        logits[..., :width].masked_fill_(~allowed[:width], float("-inf"))

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        return bool(self.matcher.is_stopped() or self.matcher.is_accepting())
