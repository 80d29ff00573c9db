"""The libraries poolbroker depends on or adapts, as requirement lines, for a run away from the lock.

    python scripts/library_versions.py > libraries.txt

Read from pyproject.toml: the dependencies, every extra, and the test group without its tools
(pytest, ruff, mypy... stay as locked, so a run tells about the libraries and nothing else).
`scripts/setup.sh` (ensure_moved_venv) resolves them to their newest releases for
`./scripts/test --latest`, and to the oldest each range admits for `./scripts/test --oldest`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(project: dict[str, Any]) -> list[str]:
    """Every library requirement of the project (the project's own extras are listed in full)."""
    name = project["project"]["name"]
    lines = list(project["project"]["dependencies"])
    for extra in project["project"].get("optional-dependencies", {}).values():
        lines += extra
    lines += [line for line in project["dependency-groups"]["test"] if isinstance(line, str)]
    return sorted({line for line in lines if not line.startswith(name)})


if __name__ == "__main__":
    print("\n".join(requirements(tomllib.loads(PYPROJECT.read_text()))))
