"""Method forms built from the registered configs (``openpto.configs()``, read once in a child
process so that the UI never imports torch), validated as the user types, and turned into an
``opt`` command line.

A field's text is checked against its declared type; an empty field means "the default"
(nothing is passed, the command picks it). Checks that need the model (a group size that does
not divide a layer's width) are left to the dry run, which the CLI answers with one clear error.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from openpto.tui.jobs import python_json

CATALOG_CODE = "import json, openpto; print(json.dumps(openpto.configs(), default=str))"


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str
    default: Any
    help: str

    @property
    def is_bool(self) -> bool:
        return self.type == "bool"

    def default_text(self) -> str:
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return str(self.default)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # "quantization" or "sparsity"
    description: str
    fields: tuple[FieldSpec, ...]


def catalog_from(configs: list[dict[str, Any]]) -> dict[str, MethodSpec]:
    out = {}
    for c in configs:
        fields = tuple(FieldSpec(f["name"], str(f["type"]), f.get("default"), f.get("help", ""))
                       for f in c.get("fields", []))
        out[c["name"]] = MethodSpec(c["name"], c.get("kind", ""), c.get("description", ""),
                                    fields)
    return out


class Catalog:
    """The registered methods, fetched once per process (about 2 s: the child imports torch)."""

    def __init__(self, configs: list[dict[str, Any]] | None = None) -> None:
        """``configs``: ``openpto.configs()``'s list when the caller has it already."""
        self._methods = catalog_from(configs) if configs is not None else None
        self._loading: asyncio.Future[dict[str, MethodSpec]] | None = None

    async def methods(self) -> dict[str, MethodSpec]:
        if self._methods is not None:
            return self._methods
        if self._loading is None or self._loading.done():
            # One child process however many screens ask at once.
            self._loading = asyncio.ensure_future(self._fetch())
        self._methods = await asyncio.shield(self._loading)
        return self._methods

    async def _fetch(self) -> dict[str, MethodSpec]:
        return catalog_from(await python_json(CATALOG_CODE))

    def of_kind(self, kind: str) -> list[MethodSpec]:
        return [m for m in (self._methods or {}).values() if m.kind == kind]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


GROUP_SIZES = (32, 64, 128)


def check_group_size(text: str) -> int | str:
    """A group size: 32, 64 or 128 columns per scale, ``auto``, or ``channel`` (one scale per
    output row: ``none``, which the command reads as None)."""
    low = text.strip().lower()
    if low == "auto":
        return "auto"
    if low in ("channel", "per-channel", "none"):
        return "none"
    sizes = ", ".join(map(str, GROUP_SIZES))
    try:
        value = int(low)
    except ValueError:
        raise ValueError(f"group size {text!r}: one of {sizes}, 'auto' or 'channel'") from None
    if value not in GROUP_SIZES:
        raise ValueError(f"group size {value}: one of {sizes}, 'auto' or 'channel'")
    return value


def check_field(spec: FieldSpec, text: str) -> Any:
    """``text`` as the field's value (None for an empty optional field); ValueError says why
    it does not fit."""
    text = text.strip()
    if spec.name == "group_size":
        return None if text == "" and "None" in spec.type else check_group_size(text or "auto")
    if text == "":
        if "None" in spec.type or spec.default is None:
            return None
        raise ValueError(f"{spec.name} needs a value ({spec.type})")
    kinds = [k.strip() for k in spec.type.split("|") if k.strip() != "None"]
    errors = []
    for kind in kinds:
        try:
            value = _convert(kind, text)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        _check_range(spec.name, value)
        return value
    raise ValueError(f"{spec.name}: " + "; ".join(errors or [f"takes {spec.type}"]))


def _convert(kind: str, text: str) -> Any:
    if kind == "int":
        return _int(text)
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if kind == "bool":
        low = text.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{text!r} is not true or false")
    return text


def _check_range(name: str, value: Any) -> None:
    if name == "bits" and isinstance(value, int) and not 2 <= value <= 8:
        raise ValueError(f"bits {value}: 2 to 8")
    if name == "sparsity" and isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError(f"sparsity {value}: between 0 and 1 (0.5 zeroes half the weights)")
    if name == "pattern" and isinstance(value, str):
        n, _, m = value.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"pattern {value!r}: N:M with N < M, e.g. 2:4")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"{name} {value}: must not be negative")


def set_args(values: dict[str, Any]) -> list[str]:
    """``--set field=value`` for each field that has a value (None: leave it to the command)."""
    out = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out += ["--set", f"{name}={value}"]
    return out


def describe(values: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in values.items() if v is not None})
