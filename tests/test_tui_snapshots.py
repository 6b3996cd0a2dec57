"""Each screen rendered at 80x24, compared with the SVG committed under tests/tui_snapshots/.

After an intended change of the layout, regenerate the references with
``OPT_UPDATE_TUI_SNAPSHOTS=1 pytest tests/test_tui_snapshots.py`` and look at them
(``docs/tui.md`` says how to turn them into PNGs). The screens get fixed inputs (an empty
database, a fixed ``opt info`` answer, the registered methods) so that the picture depends on
the code alone; the references are tied to the Textual version in use (8.2)."""

from __future__ import annotations

import difflib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("textual")

from textual.widgets import Input

from openpto.tui.app import OptApp, make_app
from openpto.tui.forms import Catalog
from tests.tui_helpers import MACHINE, registered_configs, sync, wait_for

REFERENCES = Path(__file__).parent / "tui_snapshots"
UPDATE = os.environ.get("OPT_UPDATE_TUI_SNAPSHOTS") == "1"
# A fixed place, because the Settings screen shows where it saves.
CONFIG_DIR = Path("/tmp/openpto-tui-snapshots")
SCREENS = ["home", "quantize", "sparsify", "measure", "serve", "agent", "runs", "settings",
           "help"]


@pytest.fixture(scope="module")
def configs() -> list[dict[str, Any]]:
    return registered_configs()


def _text_of(svg: str) -> list[str]:
    """The characters of each row of an exported screen (for a readable diff)."""
    rows: dict[str, list[str]] = {}
    for y, text in re.findall(r'<text [^>]*y="([\d.]+)"[^>]*>(.*?)</text>', svg):
        rows.setdefault(y, []).append(text.replace("&#160;", " "))
    return ["".join(parts) for _, parts in sorted(rows.items(), key=lambda kv: float(kv[0]))]


async def _render(app: OptApp, name: str) -> str:
    async with app.run_test(size=(80, 24)) as pilot:
        if name == "help":
            await pilot.press("f1")
        elif name != "home":
            app.action_go(name)
        await pilot.pause()
        screen = app.screen
        if name in ("quantize", "sparsify"):
            form = screen.query_one("#form")
            await wait_for(pilot, lambda: form.built_for is not None, what="the form")
        if name in ("home", "runs"):
            table = "#recent" if name == "home" else "#rows"
            await wait_for(pilot, lambda: bool(screen.query_one(table).columns),
                           what="the tables")
        for field in app.screen.query(Input):
            field.cursor_blink = False  # a blinking cursor would make every picture differ
        await pilot.pause(0.3)
        return app.export_screenshot(title="openpto")


@pytest.mark.parametrize("name", SCREENS)
@sync
async def test_screen_matches_its_reference(name: str, tmp_path: Path,
                                            configs: list[dict[str, Any]]) -> None:
    shutil.rmtree(CONFIG_DIR, ignore_errors=True)
    CONFIG_DIR.mkdir(parents=True)
    app = make_app(theme="dark", db_path=tmp_path / "opt.db",
                   config_file=CONFIG_DIR / "config.toml", catalog=Catalog(configs),
                   machine=MACHINE)
    svg = await _render(app, name)
    reference = REFERENCES / f"{name}.svg"
    if UPDATE or not reference.exists():
        reference.write_text(svg)
        if not UPDATE:
            pytest.fail(f"no reference for {name}: wrote {reference}; look at it and commit it")
        return
    expected = reference.read_text()
    if svg != expected:
        diff = "\n".join(difflib.unified_diff(_text_of(expected), _text_of(svg), "reference",
                                              "now", lineterm=""))
        pytest.fail(f"the {name} screen changed (OPT_UPDATE_TUI_SNAPSHOTS=1 regenerates):\n"
                    f"{diff or '(same text, other styles)'}")
