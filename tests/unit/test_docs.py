"""The reference pages are generated from the code (scripts/docs_reference.py): a setting, flag or
metric added or changed without regenerating them fails here."""

from __future__ import annotations

import importlib.util

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
