"""Run tracking in one SQLite database (sqlite-utils, ordered migrations, WAL mode).

This package imports no torch: the database can be browsed and queried without the ML stack.
"""

from openpto.store.db import Store, default_db_path, opt_home
from openpto.store.runs import RunRecorder

__all__ = ["RunRecorder", "Store", "default_db_path", "opt_home"]
