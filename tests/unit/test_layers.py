"""The broker's layers, as its imports show them: operate -> drive -> decide -> the settings and
the wire types; the client and the adapters never import the broker; no module imports one that
imports it back; nothing imports the repository's folders by their own names (client, broker):
everything is `poolbroker.*`, the one package that is installed."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    """The module's name in the installed package (client/ and broker/ are poolbroker's)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "poolbroker":
        parts.insert(0, "poolbroker")
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
    return {name for name in found if name.split(".")[0] in ("broker", "client", "poolbroker")}


# (poolbroker/client and poolbroker/broker are links to client/ and broker/: each file once)
SOURCES = [p for folder in ("broker", "client") for p in (ROOT / folder).rglob("*.py")]
SOURCES += [p for p in (ROOT / "poolbroker").glob("*.py")]
MODULES = {module_name(p): p for p in SOURCES}
# (a package importing its own submodules is not a module importing itself)
IMPORTS = {name: {i for i in imports_of(path) if i in MODULES and i != name} for name, path in MODULES.items()}
# The layers hold for types too: a decision never names a type of the driver's.
TYPE_IMPORTS = {
    name: {i for i in imports_of(path, types_too=True) if i in MODULES and i != name} for name, path in MODULES.items()
}
# The settings, and what both sides of the wire share: its types, endpoints and key files, and
# PostgreSQL's framing (the broker's session tracker and the worker's bridge both follow it).
SHARED = {
    "poolbroker.broker",
    "poolbroker.broker.config",
    "poolbroker.client.protocol",
    "poolbroker.client.endpoint",
    "poolbroker.client.keys",
    "poolbroker.client.pgwire",
}
ADAPTERS = {
    "poolbroker",
    "poolbroker.redis",
    "poolbroker.redis_asyncio",
    "poolbroker.http",
    "poolbroker.memcache",
    "poolbroker.requests",
    "poolbroker.httpx",
    "poolbroker.postgres",
    "poolbroker.pg_link",
    "poolbroker.pg_inline",
    "poolbroker.pg_bridge",
    "poolbroker.pg_greeter",
    "poolbroker.pg_statements",
    "poolbroker.pytest_plugin",
}  # the package's face: the client's users


def layer(name: str) -> str:
    if name in ADAPTERS:
        return "adapters"
    for prefix in (
        "poolbroker.broker.decide",
        "poolbroker.broker.drive",
        "poolbroker.broker.operate",
        "poolbroker.client",
    ):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return name


def test_nothing_imports_the_folders_by_their_own_names() -> None:
    bare = {
        f"{name} imports {target}"
        for name, path in MODULES.items()
        for target in imports_of(path, types_too=True)
        if target.split(".")[0] in ("client", "broker")
    }
    assert not bare, bare


def test_imports_point_down_only() -> None:
    allowed = {
        "adapters": {"adapters", "poolbroker.client"},
        "poolbroker.client": {"poolbroker.client"},
        "poolbroker.broker.decide": {"poolbroker.broker.decide"} | SHARED,
        "poolbroker.broker.drive": {"poolbroker.broker.drive", "poolbroker.broker.decide"} | SHARED,
        "poolbroker.broker.operate": {
            "poolbroker.broker.operate",
            "poolbroker.broker.drive",
            "poolbroker.broker.decide",
            "poolbroker.client",
        }
        | SHARED,
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
    client_side = {
        i for name, imports in TYPE_IMPORTS.items() if layer(name) in ("poolbroker.client", "adapters") for i in imports
    }
    assert not any(i.startswith("poolbroker.broker") for i in client_side)


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


def test_the_greeter_needs_nothing_but_the_standard_library() -> None:
    """pg_greeter runs from its file in a process of its own (python -I): it must start fast, and
    can't count on the package being importable there."""
    tree = ast.parse((ROOT / "poolbroker" / "pg_greeter.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported - sys.stdlib_module_names
