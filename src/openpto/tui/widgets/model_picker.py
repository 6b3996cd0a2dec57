"""A model field: type an alias, folder, artifact or .gguf path, or browse for one."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Input

DEFAULT_MODEL = "smollm2-135m"


class ModelPicker(Horizontal):
    """``value`` is the text of the field; ``Browse`` opens a file picker rooted at home."""

    def __init__(self, value: str = "", *, placeholder: str = DEFAULT_MODEL,
                 id: str | None = None) -> None:
        super().__init__(id=id, classes="model-picker")
        self._initial = value
        self._placeholder = placeholder

    def compose(self) -> ComposeResult:
        yield Input(self._initial, placeholder=f"model: alias, folder, artifact or .gguf "
                    f"(default {self._placeholder})", classes="model-input", compact=True)
        yield Button("Browse…", classes="browse", compact=True)

    @property
    def value(self) -> str:
        return self.query_one(Input).value.strip()

    @value.setter
    def value(self, text: str) -> None:
        self.query_one(Input).value = text

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if "browse" in event.button.classes:
            event.stop()
            self.browse()

    def browse(self) -> None:
        from openpto.tui.screens.dialogs import FilePicker

        start = Path(self.value).expanduser() if self.value else Path.home()
        if not start.is_dir():
            start = start.parent if start.parent.is_dir() else Path.home()

        def picked(path: Path | None) -> None:
            if path is not None:
                self.value = str(path)

        self.app.push_screen(FilePicker(start), picked)
