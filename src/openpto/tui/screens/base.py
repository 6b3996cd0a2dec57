"""What every screen shares: the header and footer, the app's state, errors as notifications."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen

from openpto.errors import OptError
from openpto.tui.jobs import JobFailed

if TYPE_CHECKING:
    from openpto.tui.app import OptApp

#: errors a screen shows as a notification instead of a traceback
SHOWN_ERRORS = (OptError, JobFailed, OSError, ValueError)


class OptScreen(Screen[None]):
    """A top-level screen; ``opt`` is the app with its database, catalog and user config."""

    #: the screen's name in the command palette and the help
    TITLE = ""
    HELP = ""

    def on_mount(self) -> None:
        # Textual calls each class's on_mount in turn: every top-level screen registers here.
        if self.name:
            self.opt.screens_made[self.name] = self

    @property
    def opt(self) -> OptApp:
        return cast("OptApp", self.app)

    def fail(self, message: str) -> None:
        self.notify(message, title="error", severity="error", timeout=8, markup=False)
