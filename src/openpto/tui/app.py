"""The ``opt-tui`` application: ``make_app()`` builds it for the script, ``opt tui`` and tests.

Nothing here imports torch: jobs run as ``opt`` subprocesses (see ``jobs.py``), the registered
configs are read once in a child process, and the run database is read through the store."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from openpto.errors import OptError
from openpto.tui.forms import Catalog
from openpto.tui.jobs import JobFailed, run_json
from openpto.tui.screens.base import OptScreen
from openpto.user_config import UserConfig, config_path, load

if TYPE_CHECKING:
    from openpto.store import Store

THEMES = {"dark": "textual-dark", "light": "textual-light"}

#: (mode name, title, key, "module:class"): every top-level screen, in menu order. A screen's
#: module is imported when the screen is first opened, which keeps the first paint quick.
SCREENS: list[tuple[str, str, str, str]] = [
    ("home", "Home", "1", "home:HomeScreen"),
    ("quantize", "Quantize", "2", "compress:QuantizeScreen"),
    ("sparsify", "Sparsify", "3", "compress:SparsifyScreen"),
    ("measure", "Evaluate / Profile / Bench", "4", "measure:MeasureScreen"),
    ("serve", "Serve", "5", "serve:ServeScreen"),
    ("agent", "Agent", "6", "agent:AgentScreen"),
    ("runs", "Runs / Datasette", "7", "runs:RunsScreen"),
    ("settings", "Settings", "8", "settings:SettingsScreen"),
]


def screen_class(spec: str) -> type[OptScreen]:
    module, _, name = spec.partition(":")
    cls: type[OptScreen] = getattr(importlib.import_module(f"openpto.tui.screens.{module}"), name)
    return cls


def _make_screen(spec: str) -> Screen[Any]:
    return screen_class(spec)()


class OptApp(App[None]):
    """The terminal UI. ``db_path`` None means ``OPT_DB`` or ``OPT_HOME/opt.db``."""

    CSS_PATH = "opt.tcss"
    TITLE = "openpto"
    BINDINGS: ClassVar[list[BindingType]] = [
        # F2..F9 work everywhere; the digits only where no text field has the focus.
        *[Binding(f"f{int(key) + 1},{key}", f"go('{name}')", title.split(" ")[0],
                  id=f"app.{name}", show=False)
          for name, title, key, _ in SCREENS],
        Binding("question_mark,f1", "help", "Help", id="app.help"),
        Binding("ctrl+t", "toggle_theme", "Theme", id="app.theme"),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
    ]

    def __init__(self, *, theme: str | None = None, db_path: str | Path | None = None,
                 config_file: Path | None = None, catalog: Catalog | None = None,
                 machine: dict[str, Any] | None = None) -> None:
        self.config_file = config_file if config_file is not None else config_path()
        self.config_error: str | None = None
        try:
            self.user_config = load(self.config_file)
        except OptError as exc:
            self.user_config, self.config_error = UserConfig(), str(exc)
        self.db_path = Path(db_path).expanduser() if db_path is not None else None
        self.catalog = catalog if catalog is not None else Catalog()
        #: ``opt info --json`` once read (given: no child process is started for it)
        self.machine = machine
        #: the top-level screens made so far, by mode name (each registers itself on mount)
        self.screens_made: dict[str, OptScreen] = {}
        super().__init__()
        self.requested_theme = theme or self.user_config.theme

    DEFAULT_MODE = "home"
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = {
        name: functools.partial(_make_screen, spec) for name, _, _, spec in SCREENS}

    def on_mount(self) -> None:
        self.apply_theme(self.requested_theme)
        self.apply_keymap()
        self.run_worker(self._prefetch_catalog(), group="catalog")
        if self.config_error:
            self.notify(f"{self.config_error} (using the built-in defaults)", severity="error",
                        timeout=10)

    async def _prefetch_catalog(self) -> None:
        """Read the registered methods early, so the forms are ready when first opened."""
        try:
            await self.catalog.methods()
        except (OSError, ValueError, JobFailed) as exc:
            self.notify(f"cannot read the registered methods: {exc}", severity="error")

    # -- state the screens share -----------------------------------------------------------
    def store(self) -> Store:
        """A fresh handle on the run database (one per call: workers run in other threads)."""
        from openpto.store import Store

        return Store(self.db_path)

    async def machine_info(self) -> dict[str, Any]:
        if self.machine is None:
            self.machine = await run_json(["info"], self.db_path)
        return self.machine

    def runs_changed(self) -> None:
        """A job wrote to the database: the Home and Runs screens reload when shown."""
        for name in ("home", "runs"):
            screen = self.screens_made.get(name)
            refresh = getattr(screen, "action_refresh", None)
            if screen is not None and screen.is_current and refresh is not None:
                refresh()

    def serving_url(self) -> str | None:
        serve = self.screens_made.get("serve")
        return getattr(serve, "url", None)

    def show_run(self, run_id: str) -> None:
        from openpto.tui.screens.runs import RunDetail

        self.push_screen(RunDetail(run_id))

    # -- theme and keys --------------------------------------------------------------------
    def apply_theme(self, name: str) -> None:
        self.theme = THEMES.get(name, name)

    @property
    def theme_name(self) -> str:
        return "light" if self.theme == THEMES["light"] else "dark"

    def action_toggle_theme(self) -> None:
        self.apply_theme("light" if self.theme_name == "dark" else "dark")
        self.notify(f"theme: {self.theme_name} (Settings saves it)")

    def keymap_actions(self) -> list[tuple[str, str, str]]:
        """Every binding that has an id: (id, description, default keys), for Settings."""
        seen: dict[str, tuple[str, str, str]] = {}
        classes = {screen_class(spec) for _, _, _, spec in SCREENS}
        for cls in [type(self), *sorted(classes, key=lambda c: c.__name__)]:
            for binding in getattr(cls, "BINDINGS", []):
                if isinstance(binding, Binding) and binding.id and binding.id not in seen:
                    seen[binding.id] = (binding.id, f"{binding.id}: {binding.description}",
                                        binding.key)
        return list(seen.values())

    def apply_keymap(self) -> None:
        self.set_keymap(dict(self.user_config.keys))

    # -- navigation ------------------------------------------------------------------------
    def action_go(self, name: str) -> None:
        if name not in self.MODES:
            self.notify(f"no screen {name!r}", severity="error")
            return
        self.switch_mode(name)

    def action_help(self) -> None:
        from openpto.tui.screens.help import HelpScreen

        self.push_screen(HelpScreen(self.help_text()))

    def help_text(self) -> str:
        lines = ["# openpto terminal UI", "",
                 "Every screen has its keys in the footer; **ctrl+p** opens the command palette "
                 "(every screen and action); **ctrl+t** toggles the theme; **ctrl+q** quits.",
                 "", "| key | screen |", "|---|---|"]
        lines += [f"| {self._key(f'app.{n}', f'f{int(k) + 1}, {k}')} | {t} |"
                  for n, t, k, _ in SCREENS]
        screen = self.screen
        if isinstance(screen, OptScreen):
            lines += ["", f"## {screen.TITLE or screen.name or ''}", "", screen.HELP or "", "",
                      "| key | action |", "|---|---|"]
            for binding in getattr(screen, "BINDINGS", []):
                if isinstance(binding, Binding):
                    lines.append(f"| {self._key(binding.id, binding.key)} | "
                                 f"{binding.description} |")
        return "\n".join(lines)

    def _key(self, binding_id: str | None, default: str) -> str:
        return self.user_config.keys.get(binding_id or "", default)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        for name, title, key, _ in SCREENS:
            yield SystemCommand(f"Go to {title}",
                                f"Open the {title} screen (F{int(key) + 1} or {key})",
                                functools.partial(self.action_go, name))
        yield SystemCommand("Help", "Keys of every screen (?)", self.action_help)
        yield SystemCommand("Toggle theme", "Dark or light (ctrl+t)", self.action_toggle_theme)
        for binding in getattr(screen, "BINDINGS", []):
            if isinstance(binding, Binding) and binding.description:
                title = screen.TITLE if isinstance(screen, OptScreen) else ""
                yield SystemCommand(f"{title}: {binding.description}".lstrip(": "),
                                    f"{binding.key} on this screen",
                                    functools.partial(screen.run_action, binding.action))
        yield SystemCommand("Quit", "Leave the app (ctrl+q)", self.exit)

    async def on_unmount(self) -> None:
        for screen in self.screens_made.values():
            for stop in ("stop_server", "stop_datasette"):
                method = getattr(screen, stop, None)
                if method is not None:
                    await method()


def make_app(theme: str | None = None, db_path: str | Path | None = None,
             config_file: Path | None = None, catalog: Catalog | None = None,
             machine: dict[str, Any] | None = None) -> OptApp:
    """The app, as ``opt-tui``, ``opt tui`` and the tests build it. ``catalog`` and ``machine``
    (the registered methods, ``opt info``'s JSON) are read in child processes unless given."""
    if theme is not None and theme not in THEMES:
        raise ValueError(f"theme {theme!r}: dark or light")
    return OptApp(theme=theme, db_path=db_path, config_file=config_file, catalog=catalog,
                  machine=machine)


def run(argv: list[str] | None = None) -> None:
    """The ``opt-tui`` script."""
    parser = argparse.ArgumentParser(prog="opt-tui", description="The openpto terminal UI. "
                                     "Example: opt-tui --theme light")
    parser.add_argument("--theme", choices=sorted(THEMES), help="dark or light")
    parser.add_argument("--db", metavar="PATH", help="the run database (default OPT_DB, else "
                        "OPT_HOME/opt.db)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    make_app(theme=args.theme, db_path=args.db).run()
