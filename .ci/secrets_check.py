"""Fail when detect-secrets finds a secret that the committed baseline does not list.

A baseline's line numbers go stale as files change; what is compared is each finding's file and
hashed secret, so a moved line is not a new secret.
"""

from __future__ import annotations

import json
import subprocess
import sys

EXCLUDE = r"(^|/)\.venv|\.git/|benchmarks/results/|^\.secrets\.baseline$"


def findings(report: dict) -> set[tuple[str, str]]:
    return {(path, item["hashed_secret"]) for path, items in report["results"].items()
            for item in items}


def main() -> int:
    scan = subprocess.run([sys.executable, "-m", "detect_secrets", "scan", "--exclude-files",
                           EXCLUDE], capture_output=True, text=True, check=True)
    with open(".secrets.baseline") as handle:
        known = findings(json.load(handle))
    new = sorted(findings(json.loads(scan.stdout)) - known)
    for path, _ in new:
        print(f"detect-secrets: a possible secret in {path} (not in .secrets.baseline)",
              file=sys.stderr)
    print(f"detect-secrets: {len(new)} new finding(s), {len(known)} in the baseline")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
