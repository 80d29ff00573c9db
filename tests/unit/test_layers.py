"""The broker's layers, as its imports show them: operate -> drive -> decide -> the settings and
the wire types (poolbroker.wire, which both sides share); the client and the adapters never
import the broker, nor the broker the client below operate; decide/ is pure (no sockets, clocks,
threads, processes or files, nor anything that imports them); no module imports one that imports
it back; nothing imports the repository's folders by their own names (client, broker):
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
SOURCES += [p for p in (ROOT / "poolbroker").rglob("*.py") if p.relative_to(ROOT).parts[1] not in ("broker", "client")]
MODULES = {module_name(p): p for p in SOURCES}
# (a package importing its own submodules is not a module importing itself)
IMPORTS = {name: {i for i in imports_of(path) if i in MODULES and i != name} for name, path in MODULES.items()}
# The layers hold for types too: a decision never names a type of the driver's.
TYPE_IMPORTS = {
    name: {i for i in imports_of(path, types_too=True) if i in MODULES and i != name} for name, path in MODULES.items()
}
WIRE = "poolbroker.wire"  # what both sides share: its types, endpoints and key files, PostgreSQL's framing
SESSIONS = "poolbroker.sessions"  # what a holder's stream left (pure): the relay's and the socket leases'
SETTINGS = "poolbroker.broker.settings"  # the broker's settings (plain dataclasses)
ADAPTERS = {
    "poolbroker",
    "poolbroker.redis",
    "poolbroker.redis_asyncio",
    "poolbroker.http",
    "poolbroker.memcache",
    "poolbroker.requests",
    "poolbroker.httpx",
    "poolbroker.postgres",
    "poolbroker.postgres._link",
    "poolbroker.postgres._inline",
    "poolbroker.postgres._bridge",
    "poolbroker.postgres._greeter",
    "poolbroker.postgres._statements",
    "poolbroker.pytest_plugin",
    "poolbroker.web",
}  # the package's face: the client's users


def layer(name: str) -> str:
    if name in ADAPTERS:
        return "adapters"
    if name == "poolbroker.__main__":  # (python -m poolbroker: the CLI)
        return "poolbroker.broker.operate"
    for prefix in (
        "poolbroker.broker.decide",
        "poolbroker.broker.drive",
        "poolbroker.broker.operate",
        "poolbroker.client",
        WIRE,
        SESSIONS,
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
    below = {"poolbroker.broker", SETTINGS, WIRE, SESSIONS}  # (the broker's package: its docstring and version)
    allowed = {
        WIRE: {WIRE},
        SESSIONS: {SESSIONS, WIRE},
        "poolbroker.broker": {WIRE},
        SETTINGS: set(),
        "poolbroker.broker.config": {SETTINGS, WIRE},
        "adapters": {"adapters", "poolbroker.client", WIRE, SESSIONS},
        "poolbroker.client": {"poolbroker.client", WIRE, SESSIONS},
        "poolbroker.broker.decide": {"poolbroker.broker.decide"} | below,
        "poolbroker.broker.drive": {"poolbroker.broker.drive", "poolbroker.broker.decide"} | below,
        "poolbroker.broker.operate": {
            "poolbroker.broker.operate",
            "poolbroker.broker.drive",
            "poolbroker.broker.decide",
            "poolbroker.broker.config",
            "poolbroker.client",
        }
        | below,
    }
    wrong = []
    for name, imported in TYPE_IMPORTS.items():
        here = layer(name)
        assert here in allowed or name == "poolbroker.broker", f"{name}: in no layer"
        for target in imported:
            if layer(target) not in allowed.get(here, set()):
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


# What a decision must not import, nor anything it imports: it never touches a socket, a clock, a
# thread, a process or a file (the driver does, and tells it what happened, and when).
IMPURE = {"socket", "select", "ssl", "selectors", "time", "threading", "asyncio", "subprocess", "os", "zmq"}
IMPURE |= {"tomllib", "pathlib", "tempfile", "shutil", "signal", "logging"}


def all_imports_of(path: Path) -> set[str]:
    """Every module `path` imports when it runs, by its top-level name (the standard library's too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_decisions_are_pure() -> None:
    """decide/ and what it imports of the project (the settings, the wire types) import nothing
    that does I/O or keeps time."""
    reached = {name for name in MODULES if layer(name) == "poolbroker.broker.decide"}
    todo = list(reached)
    while todo:
        for target in TYPE_IMPORTS[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    impure = {
        f"{name} imports {', '.join(sorted(bad))}"
        for name in reached
        if (bad := all_imports_of(MODULES[name]) & IMPURE)
    }
    assert not impure, impure


# Modules still to be split (none now).
NOT_YET_SPLIT: set[str] = set()


def test_no_module_is_much_over_400_lines() -> None:
    long = {name for name, path in MODULES.items() if len(path.read_text().splitlines()) > 480}
    assert long <= NOT_YET_SPLIT, long - NOT_YET_SPLIT


def test_the_greeter_needs_nothing_but_the_standard_library() -> None:
    """The greeter (postgres/_greeter.py) runs from its file in a process of its own (python -I):
    it must start fast, and can't count on the package being importable there."""
    tree = ast.parse((ROOT / "poolbroker" / "postgres" / "_greeter.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - {"__future__"} <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def test_drive_s_helpers_reach_the_loop_through_its_doors_only() -> None:
    """Leasing, the upstream connections' driver and the rest of drive/ never name the Server:
    they get what they need through drive/doors.py's small interfaces (types included)."""
    server = "poolbroker.broker.drive.server"
    naming = {
        name for name, imports in TYPE_IMPORTS.items() if layer(name) == "poolbroker.broker.drive" and server in imports
    }
    assert not naming, naming


def test_adapters_use_the_client_s_public_and_extension_api_only() -> None:
    """poolbroker's adapters (redis, httpx, postgres...) build on what any adapter may: the client's
    public names (`poolbroker.client`) and its extension API, never its private modules."""
    private = {
        f"{name} imports {target}"
        for name, imports in TYPE_IMPORTS.items()
        if layer(name) == "adapters"
        for target in imports
        if target.startswith("poolbroker.client._")
    }
    assert not private, private
