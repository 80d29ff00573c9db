"""The broker's layers, as its imports show them: operate -> drive -> decide -> the settings and
the wire types; the client never imports the broker; no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, *, types_too: bool = False) -> set[str]:
    """What a module imports when it runs; with `types_too`, also what it imports for the type
    checker alone (under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not types_too:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            for child in ("body", "orelse", "finalbody", "handlers"):
                visit([n for n in getattr(node, child, []) if isinstance(n, ast.stmt)])

    visit(tree.body)
    return {name for name in found if name.split(".")[0] in ("broker", "client")}


MODULES = {module_name(p): p for folder in ("broker", "client") for p in (ROOT / folder).rglob("*.py")}
# (a package importing its own submodules is not a module importing itself)
IMPORTS = {name: {i for i in imports_of(path) if i in MODULES and i != name} for name, path in MODULES.items()}
# The layers hold for types too: a decision never names a type of the driver's.
TYPE_IMPORTS = {
    name: {i for i in imports_of(path, types_too=True) if i in MODULES and i != name} for name, path in MODULES.items()
}
# The settings, and what both sides of the wire share: its types, endpoints and key files.
SHARED = {"broker", "broker.config", "client.protocol", "client.endpoint", "client.keys"}


def layer(name: str) -> str:
    for prefix in ("broker.decide", "broker.drive", "broker.operate", "client"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return name


def test_imports_point_down_only() -> None:
    allowed = {
        "client": {"client"},
        "broker.decide": {"broker.decide"} | SHARED,
        "broker.drive": {"broker.drive", "broker.decide"} | SHARED,
        "broker.operate": {"broker.operate", "broker.drive", "broker.decide", "client"} | SHARED,
    }
    wrong = []
    for name, imported in TYPE_IMPORTS.items():
        here = layer(name)
        if here not in allowed:
            continue
        for target in imported:
            if target not in SHARED and layer(target) not in allowed[here]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong
    client_imports = {i for name, imports in TYPE_IMPORTS.items() if name.startswith("client") for i in imports}
    assert not any(i.startswith("broker") for i in client_imports)


def test_no_module_imports_one_that_imports_it_back() -> None:
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in IMPORTS.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):  # type: ignore[func-returns-value]
                return True
        return False

    cycles = [name for name in IMPORTS if reaches(name, name, set())]
    assert not cycles, cycles


# Modules still to be split (none now).
NOT_YET_SPLIT: set[str] = set()


def test_no_module_is_much_over_400_lines() -> None:
    long = {name for name, path in MODULES.items() if len(path.read_text().splitlines()) > 480}
    assert long <= NOT_YET_SPLIT, long - NOT_YET_SPLIT
