"""openpto: make open language models smaller and faster after training, and prove it.

Importing this package is cheap: it pulls in no torch, fastapi, textual or typer and never
initialises CUDA. Import the submodules you need (``openpto.api``, ``openpto.models``, ...).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
