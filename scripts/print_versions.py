"""Print the version that this environment resolved for every package requirements.txt names, one line each, with
the range asked for beside it (CI prints it into its log; a bug report pastes it).

    python scripts/print_versions.py
"""
from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


def requirement_lines(path: Path = REQUIREMENTS) -> list[tuple[str, str]]:
    """(package name, the requirement as written) for every requirement line, markers kept in the text."""
    found = []
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            found.append((re.match(r"[A-Za-z0-9_.\-]+", text).group(0), text))
    return found


def resolved(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    print(f"python {sys.version.split()[0]}")
    for name, wanted in requirement_lines():
        print(f"{name} {resolved(name)}  (asked: {wanted})")


if __name__ == "__main__":
    main()
