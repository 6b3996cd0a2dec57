"""A form built from a registered method config: one input per field, checked as you type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select

from openpto.tui.forms import FieldSpec, MethodSpec, check_field


class MethodForm(Vertical):
    """``values()`` gives the field values (raises ValueError naming every bad field)."""

    @dataclass
    class Changed(Message):
        """A field or the method changed; ``errors`` maps field names to what is wrong."""

        form: MethodForm
        errors: dict[str, str]

    def __init__(self, methods: list[MethodSpec] | None = None, *, initial: str | None = None,
                 id: str | None = None) -> None:
        super().__init__(id=id, classes="method-form")
        self.methods: dict[str, MethodSpec] = {m.name: m for m in methods or []}
        self.initial = initial
        self.errors: dict[str, str] = {}
        #: the method whose fields are on screen (None while they are being rebuilt)
        self.built_for: str | None = None

    def compose(self) -> ComposeResult:
        yield Select([(m, m) for m in self.methods], prompt="method (loading the registry…)",
                     allow_blank=True, id="method", compact=True)
        yield Label("", id="method-description", classes="help", markup=False)
        yield Vertical(id="fields")

    def set_methods(self, methods: list[MethodSpec], initial: str | None = None) -> None:
        self.methods = {m.name: m for m in methods}
        select = self.query_one("#method", Select)
        select.set_options([(m, m) for m in self.methods])
        select.prompt = "method"
        choice = initial or self.initial
        if choice in self.methods:
            select.value = choice
        elif self.methods:
            select.value = next(iter(self.methods))

    @property
    def method(self) -> MethodSpec | None:
        value = self.query_one("#method", Select).value
        return self.methods.get(value) if isinstance(value, str) else None

    async def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id != "method":
            return
        event.stop()
        await self._build_fields()

    async def _build_fields(self) -> None:
        self.built_for = None
        box = self.query_one("#fields", Vertical)
        await box.remove_children()
        method = self.method
        self.query_one("#method-description", Label).update(method.description if method else "")
        if method is None:
            return
        rows = [self._row(spec) for spec in method.fields]
        await box.mount_all(rows)
        self.built_for = method.name
        self._validate_all()

    def _row(self, spec: FieldSpec) -> Horizontal:
        if spec.is_bool:
            editor: Checkbox | Input = Checkbox(spec.name, bool(spec.default), compact=True,
                                                id=f"field-{spec.name}")
        else:
            editor = Input(spec.default_text(), placeholder=f"{spec.type} (empty: default)",
                           id=f"field-{spec.name}", compact=True)
        label = Label(spec.name if not spec.is_bool else "", classes="field-name")
        label.tooltip = spec.help
        editor.tooltip = spec.help
        return Horizontal(label, editor, Label("", id=f"error-{spec.name}", classes="field-error",
                                markup=False),
                          classes="field-row")

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id and event.input.id.startswith("field-"):
            self._validate_all()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self._validate_all()

    def _validate_all(self) -> None:
        self.errors = {}
        method = self.method
        if method is None:
            return
        for spec in method.fields:
            if spec.is_bool:
                continue
            text = self.query_one(f"#field-{spec.name}", Input).value
            error_label = self.query_one(f"#error-{spec.name}", Label)
            try:
                check_field(spec, text)
            except ValueError as exc:
                self.errors[spec.name] = str(exc)
                error_label.update(f"✗ {exc}")
                error_label.add_class("shown")
            else:
                error_label.update("")
                error_label.remove_class("shown")
        self.post_message(self.Changed(self, dict(self.errors)))

    def set_field(self, name: str, text: str) -> None:
        self.query_one(f"#field-{name}", Input).value = text

    def values(self) -> dict[str, Any]:
        method = self.method
        if method is None:
            raise ValueError("pick a method first (the registry is still loading?)")
        out: dict[str, Any] = {}
        problems = []
        for spec in method.fields:
            widget = self.query_one(f"#field-{spec.name}")
            if isinstance(widget, Checkbox):
                out[spec.name] = widget.value
                continue
            assert isinstance(widget, Input)
            try:
                out[spec.name] = check_field(spec, widget.value)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return out
