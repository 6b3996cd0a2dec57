"""The terminal UI (``opt-tui``): Textual screens over the same workflows the CLI runs."""
