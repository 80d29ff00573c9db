"""The libraries poolbroker depends on or adapts, as requirement lines for a run away from the lock.

    python scripts/library_versions.py --latest   # as pyproject.toml says them: the newest release wins
    python scripts/library_versions.py --oldest   # each pinned to its floor (">=X" becomes "==X")

Read from pyproject.toml: the dependencies, every extra, and the test group without its tools
(pytest, ruff, mypy... stay as locked, so a run tells about the libraries and nothing else).
`scripts/setup.sh` (ensure_moved_venv) resolves and installs these for `./scripts/test --latest`
and `./scripts/test --oldest`.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
FLOOR = re.compile(r">=\s*([^,;\s]+)")


def requirements(project: dict) -> list[str]:
    """Every library requirement of the project, the project's own extras left out (they are
    listed in full among the extras)."""
    name = project["project"]["name"]
    lines = list(project["project"]["dependencies"])
    for extra in project["project"].get("optional-dependencies", {}).values():
        lines += extra
    lines += [line for line in project["dependency-groups"]["test"] if isinstance(line, str)]
    return sorted({line for line in lines if not line.startswith(name)})


def at_floor(requirement: str) -> str:
    """'redis>=5' -> 'redis==5': the oldest release the range admits (an error if it names none)."""
    floor = FLOOR.search(requirement)
    if floor is None:
        raise SystemExit(f"{requirement!r} claims no floor: say the oldest supported release with >=")
    return requirement[: floor.start()] + f"=={floor.group(1)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--latest", action="store_true", help="the ranges as they are")
    which.add_argument("--oldest", action="store_true", help="each range's floor")
    args = parser.parse_args()
    project = tomllib.loads(PYPROJECT.read_text())
    for line in requirements(project):
        print(at_floor(line) if args.oldest else line)


if __name__ == "__main__":
    main()
