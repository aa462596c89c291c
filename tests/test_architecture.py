"""The import rules that keep the tree shaped like the design (README, "Layout"), read from the
source with ``ast``: every import counts, at module level, inside functions and under
``TYPE_CHECKING`` alike, because each of them ties one module to another.

- no import cycle among the project's modules;
- ``audio/`` and ``bridge/protocol/`` are sans-I/O: no asyncio, sockets, threads, settings,
  store, web framework or other bridge package (``bridge.models`` aside);
- only ``bridge/media/`` holds a live call's sockets: nothing else in the product imports it or a
  websocket library, except ``bridge/app.py``, which wires it;
- ``bridge/api/`` reaches calls only through the call service (no ``bridge.media``, no
  ``bridge.store``); the call service imports neither the relays nor the routes;
- ``bridge/dev/`` is imported by the CLI, the wiring (the echo agent's routes) and tests only.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("audio", "bridge")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or ``module.name`` for ``from module import name``)
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_imports(root: Path, packages=PACKAGES) -> tuple[set[str], list[Import]]:
    """The project's modules and every import statement in them (relative imports resolved)."""
    modules: set[str] = set()
    imports: list[Import] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(path, root)
            modules.add(name)
            is_package = path.name == "__init__.py"
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    imports += [Import(name, alias.name, node.lineno) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = name.split(".")
                        base = base[: len(base) - node.level + (1 if is_package else 0)]
                        parent = ".".join(base + ([node.module] if node.module else []))
                    else:
                        parent = node.module or ""
                    imports += [Import(name, f"{parent}.{alias.name}", node.lineno) for alias in node.names]
    return modules, imports


def resolve(target: str, modules: set[str]) -> str | None:
    """The project module an import loads: ``pkg.mod.Name`` -> ``pkg.mod``; None if external."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        target = resolve(imp.target, modules)
        if target is not None and not imp.source.startswith(target + ".") and target != imp.source:
            graph[imp.source].add(target)  # (a package's own __init__ is loaded first anyway)
        elif target == imp.source:
            graph[imp.source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


#: (who, what they may not import, why)
RULES = [
    (
        ("audio", "bridge.protocol"),
        ("asyncio", "socket", "selectors", "ssl", "threading", "concurrent", "multiprocessing", "subprocess",
         "sqlalchemy", "httpx", "aiohttp", "websockets", "fastapi", "starlette", "uvicorn", "uvloop", "pydantic_settings",
         "bridge.settings", "bridge.store", "bridge.calls", "bridge.media", "bridge.api", "bridge.dev", "bridge.app",
         "bridge.cli", "bridge.server"),
        "sans-I/O: bytes and times in, actions out",
    ),
    (("audio",), ("bridge",), "audio/ is a library of its own: nothing of the bridge"),
    (
        ("bridge.api", "bridge.calls", "bridge.store", "bridge.settings", "bridge.models", "bridge.protocol"),
        ("bridge.media", "websockets", "fastapi.WebSocket", "starlette.websockets", "starlette.routing.WebSocketRoute"),
        "only bridge/media holds a live call's sockets",
    ),
    (("bridge.api",), ("bridge.store",), "the API reaches calls through the call service"),
    (
        ("audio", "bridge.protocol", "bridge.media", "bridge.calls", "bridge.api", "bridge.store", "bridge.models"),
        ("openai", "google.genai", "deepgram", "elevenlabs"),
        "a provider's SDK checks messages (bridge.provider_types, imported when an agent needs it): the sockets are the bridge's own",
    ),
    (("bridge.calls",), ("bridge.api", "bridge.app"), "the call service is below the routes"),
    (("bridge.store",), ("bridge.calls", "bridge.api", "bridge.app"), "the store is below the call service"),
    (("bridge.media",), ("bridge.api", "bridge.store", "bridge.app"), "relays reach records through the call service"),
    (
        ("bridge.api", "bridge.calls", "bridge.store", "bridge.media", "bridge.protocol", "bridge.models",
         "bridge.settings", "bridge.server"),
        ("bridge.dev",),
        "developer tools are for the CLI, the wiring and tests",
    ),
]  # fmt: skip


#: pure functions of a forbidden package, allowed everywhere: websockets' C masking (an XOR)
PURE = {"websockets.speedups.apply_mask", "websockets.utils.apply_mask"}


def violations(imports: list[Import]) -> list[str]:
    found = []
    for who, forbidden, why in RULES:
        for imp in imports:
            if within(imp.source, *who) and within(imp.target, *forbidden) and imp.target not in PURE:
                found.append(f"{imp.source}:{imp.line} imports {imp.target} ({why})")
    return found


def test_no_import_cycles():
    modules, imports = read_imports(ROOT)
    assert cycles(modules, imports) == []


def test_each_package_imports_only_what_its_room_allows():
    _, imports = read_imports(ROOT)
    assert violations(imports) == []


def test_dev_tools_are_mounted_only_by_the_wiring_and_the_cli():
    _, imports = read_imports(ROOT)
    users = {imp.source for imp in imports if within(imp.target, "bridge.dev") and not within(imp.source, "bridge.dev")}
    assert users <= {"bridge.app", "bridge.cli"}, users
    # the wiring takes only the echo agent's routes, nothing of the simulator
    assert all(
        within(imp.target, "bridge.dev.echo_agent") for imp in imports if imp.source == "bridge.app" and within(imp.target, "bridge.dev")
    )


def test_the_packages_of_the_design_exist():
    for package in ("protocol", "media", "calls", "api", "store", "dev"):
        assert (ROOT / "bridge" / package / "__init__.py").is_file(), package
    assert not (ROOT / "bridge" / "relay.py").exists()  # no leftovers of the flat layout


# --- the checker catches what it claims ------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    "files, cycle",
    [
        (  # the cycle issue 10 found: app -> relay -> app, through a TYPE_CHECKING import
            {
                "bridge/__init__.py": "",
                "bridge/app.py": "from .relay import handle\n",
                "bridge/relay.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .app import Services\n",
            },
            ["bridge.app", "bridge.relay"],
        ),
        (  # through a function-level import, and a package's __init__ that loads its module
            {
                "bridge/__init__.py": "",
                "bridge/api/__init__.py": "",
                "bridge/api/calls.py": "def f():\n    from ..calls import CallService\n",
                "bridge/calls/__init__.py": "from .service import CallService\n",
                "bridge/calls/service.py": "from bridge.api.calls import router\n",
            },
            ["bridge.api.calls", "bridge.calls", "bridge.calls.service"],
        ),
    ],
)
def test_the_cycle_check_finds_cycles(tmp_path, files, cycle):
    modules, imports = read_imports(_tree(tmp_path, files), ("bridge",))
    assert cycles(modules, imports) == [cycle]


def test_the_rules_flag_a_forbidden_import(tmp_path):
    root = _tree(
        tmp_path,
        {
            "bridge/__init__.py": "",
            "bridge/protocol/__init__.py": "",
            "bridge/protocol/session.py": "import asyncio\nfrom ..models import Protocol\n",
            "bridge/api/__init__.py": "",
            "bridge/api/calls.py": "from fastapi import WebSocket\nfrom ..media.relay import x\nfrom ..dev import simulator\n",
        },
    )
    _, imports = read_imports(root, ("bridge",))
    found = violations(imports)
    assert any(v.startswith("bridge.protocol.session:1 imports asyncio") for v in found), found
    assert not any("bridge.models" in v for v in found), found
    assert any("bridge.api.calls:1 imports fastapi.WebSocket" in v for v in found), found
    assert any("bridge.api.calls:2 imports bridge.media.relay.x" in v for v in found), found
    assert any("bridge.api.calls:3 imports bridge.dev.simulator" in v for v in found), found
