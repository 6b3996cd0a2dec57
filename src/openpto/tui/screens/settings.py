"""Settings: the defaults every command uses, the theme and the key bindings, saved to
``OPT_HOME/config.toml`` (the same file the CLI reads)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Footer, Header, Input, Label, Select

from openpto.errors import UsageError
from openpto.tui.screens.base import OptScreen
from openpto.user_config import THEMES, UserConfig, config_path, save

#: the [defaults] keys this screen edits (the CLI takes any of its option names there)
DEFAULT_FIELDS = [
    ("model", "default model", "smollm2-135m"),
    ("device", "device (cpu, cuda, cuda:N, mps)", "cpu"),
    ("calib", "calibration text (file, folder, .jsonl, corpus name)", "pydoc-topics"),
    ("samples", "calibration samples", "128"),
]


class SettingsScreen(OptScreen):
    TITLE = "Settings"
    HELP = "Defaults for every command and the TUI's theme and keys, saved to config.toml."
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+s", "save", "Save", id="settings.save")]

    def __init__(self) -> None:
        super().__init__(name="settings")

    def compose(self) -> ComposeResult:
        config = self.opt.user_config
        yield Header()
        with VerticalScroll(id="settings"):
            yield Label(f"saved to {_tilde(self.opt.config_file)}", classes="help")
            yield Label("[defaults] (empty: the command's own default)", classes="section",
                        markup=False)
            for key, label, placeholder in DEFAULT_FIELDS:
                yield Horizontal(Label(label, classes="field-name"),
                                 Input(str(config.defaults.get(key, "")), placeholder=placeholder,
                                       id=f"default-{key}", compact=True), classes="field-row")
            yield Label("[tui]", classes="section", markup=False)
            yield Horizontal(Label("theme", classes="field-name"),
                             Select([(t, t) for t in THEMES], value=config.theme,
                                    allow_blank=False, id="theme", compact=True),
                             classes="field-row")
            yield Label("[tui.keys] (key names as Textual writes them, e.g. ctrl+r, f5; "
                        "comma-separated for several)", classes="section", markup=False)
            for binding_id, description, default in self.opt.keymap_actions():
                yield Horizontal(Label(description, classes="field-name"),
                                 Input(config.keys.get(binding_id, ""), placeholder=default,
                                       id=f"key-{binding_id.replace('.', '-')}", compact=True),
                                 classes="field-row")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "config.toml"

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "theme" and isinstance(event.value, str):
            self.opt.apply_theme(event.value)

    def collect(self) -> UserConfig:
        old = self.opt.user_config
        defaults = {k: v for k, v in old.defaults.items()
                    if k not in {key for key, _, _ in DEFAULT_FIELDS}}
        for key, label, _ in DEFAULT_FIELDS:
            text = self.query_one(f"#default-{key}", Input).value.strip()
            if not text:
                continue
            if key == "samples":
                if not text.isdigit() or int(text) <= 0:
                    raise UsageError(f"{label}: {text!r} is not a positive whole number")
                defaults[key] = int(text)
            else:
                defaults[key] = text
        keys = {}
        for binding_id, _, _ in self.opt.keymap_actions():
            text = self.query_one(f"#key-{binding_id.replace('.', '-')}", Input).value.strip()
            if text:
                keys[binding_id] = text
        theme = str(self.query_one("#theme", Select).value)
        return UserConfig(defaults=defaults, theme=theme, keys=keys, extra=old.extra)

    def action_save(self) -> None:
        try:
            config = self.collect()
            path = save(config, self.opt.config_file)
        except (UsageError, OSError) as exc:
            self.fail(f"settings not saved: {exc}")
            return
        self.opt.user_config = config
        self.opt.apply_keymap()
        self.notify(f"saved to {path}", title="Settings")


def _tilde(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if text.startswith(home + "/") else text


__all__ = ["SettingsScreen", "config_path"]
