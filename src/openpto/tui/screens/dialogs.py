"""Modal dialogs: a yes/no confirmation and a file picker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Label, Static


class Confirm(ModalScreen[bool]):
    """Ask before something that writes or runs long; dismisses with True or False."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(classes="dialog")
        self.question = question
        self.details = details

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Label(self.question, classes="dialog-title", markup=False)
            if self.details:
                yield Static(json.dumps(self.details, indent=2, default=str)[:2000],
                             classes="dialog-details", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Yes (y)", variant="primary", id="yes", compact=True)
                yield Button("No (n)", id="no", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class FilePicker(ModalScreen[Path | None]):
    """Pick a model folder (Enter on a folder's name selects it) or a .gguf file."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("s", "select", "Select folder"),
    ]

    def __init__(self, start: Path) -> None:
        super().__init__(classes="dialog")
        self.start = start
        self.current: Path = start

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box picker-box"):
            yield Label("Pick a model folder (s selects the highlighted folder) or a .gguf file",
                        classes="dialog-title")
            yield DirectoryTree(self.start, id="tree")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Select (s)", variant="primary", id="select", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(event.path.parent if event.path.name == "config.json" else event.path)

    def on_directory_tree_directory_selected(self, event: DirectoryTree.DirectorySelected) -> None:
        self.current = event.path

    def on_tree_node_highlighted(self, event: DirectoryTree.NodeHighlighted) -> None:  # type: ignore[type-arg]
        data = event.node.data
        path = getattr(data, "path", None)
        if isinstance(path, Path):
            self.current = path

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "select":
            self.action_select()
        else:
            self.dismiss(None)

    def action_select(self) -> None:
        self.dismiss(self.current)

    def action_cancel(self) -> None:
        self.dismiss(None)
