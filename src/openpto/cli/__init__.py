"""The ``opt`` command line: one module per noun, each command a thin wrapper over the library."""
