"""The reference pages are generated from the code (scripts/docs_reference.py): a setting, flag or
metric added or changed without regenerating them fails here."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

from tests.support import ROOT


def test_the_reference_pages_are_current() -> None:
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
    assert spec is not None and spec.loader is not None
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    stale = [
        name
        for name, make in reference.PAGE_MAKERS.items()
        if (ROOT / "docs" / "reference" / name).read_text() != make()
    ]
    assert not stale, f"{stale} are not current: run .venv/bin/python scripts/docs_reference.py"


def test_the_benchmark_page_shows_the_kept_runs() -> None:
    """docs/performance/benchmarks.md is made from docs/performance/runs/*.json
    (scripts/docs_benchmarks.py): a run kept without remaking the page fails here."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs_benchmarks.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_front_pages_links_lead_somewhere() -> None:
    """The README and its neighbours live outside the site, whose build checks its own links."""
    broken = []
    for page in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / page).read_text()):
            if not (ROOT / target).exists():
                broken.append(f"{page}: {target}")
    assert not broken, broken
