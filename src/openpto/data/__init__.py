"""Text data: built-in corpora, files, folders, JSONL and cached data sets -> token batches.

``load_text(spec)`` returns a ``TextSource`` (name, source, text, sha256); ``tokenize_text``
turns it into ids; ``calibration_batches`` samples ``[n, L]`` windows from a seed. The
calibration default is ``pydoc-topics``, the evaluation default ``stdlib-docstrings``, and the
two never overlap (see ``openpto.data.corpora``).
"""

from openpto.data.batches import (
    OverlapWarning,
    WindowSample,
    calibration_batches,
    sample_windows,
    tokenize_text,
)
from openpto.data.corpora import BUILTIN_CORPORA, CALIBRATION_DEFAULT, EVALUATION_DEFAULT
from openpto.data.sources import TextSource, load_text

__all__ = [
    "BUILTIN_CORPORA",
    "CALIBRATION_DEFAULT",
    "EVALUATION_DEFAULT",
    "OverlapWarning",
    "TextSource",
    "WindowSample",
    "calibration_batches",
    "load_text",
    "sample_windows",
    "tokenize_text",
]
