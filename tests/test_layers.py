"""DESIGN.md's layers: a module may import only from layers above it in the list; and the
API's paths are written only where the wire contract and the routes are."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tandem"
ORDER = [
    "errors",
    "domain",
    "storage",
    "catalog",
    "transport",
    "jobs",
    "operations",
    "appliance",
    "agent",
    "drill",
    "cli",
]
# Siblings that may not import each other although they are both low enough. The drill
# drives daemons through their API and CLI like an operator: it never reaches inside one.
# transport/ (the wire contract and its clients) sits below catalog in meaning: a client
# of the API knows no table.
FORBIDDEN = {
    ("storage", "catalog"),
    # The wire contract is shared by daemons and clients: no database, no operation.
    ("transport", "catalog"),
    ("agent", "appliance"),
    ("appliance", "agent"),
    *(("drill", inside) for inside in ("catalog", "jobs", "operations", "appliance", "agent")),
}
# Where a path of the API (a string starting with /api/v1) may be written: the typed clients
# of transport/, and the daemons' own routes and their access rules.
API_PATHS_ALLOWED = (
    "transport/",
    "appliance/routes_",
    "appliance/app.py",
    "appliance/auth.py",
    "appliance/audit.py",
    "agent/app.py",
)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tandem" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ORDER else None


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


MODULES = sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_imports_only_from_layers_above(path: Path) -> None:
    rel = path.relative_to(SRC)
    own = rel.parts[0].removesuffix(".py")
    if own not in ORDER:
        return  # package root files (__init__, py.typed) and the CLI entry sit outside
    for name in imports(path):
        layer = layer_of(name)
        if layer is None or layer == own:
            continue
        if own == "cli" and layer in ("appliance", "agent"):
            continue  # `tandem appliance serve` / `agent serve` start the daemons
        assert ORDER.index(layer) < ORDER.index(own), f"{rel} imports {name} (layer {layer})"
        assert (own, layer) not in FORBIDDEN, f"{rel} imports {name}"


def api_path_literals(path: Path) -> list[int]:
    """Lines of ``path`` with a string literal (not a docstring) that starts with /api/v1."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("/api/v1")
        and id(node) not in docstrings
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_api_paths_are_written_only_in_transport_and_the_routes(path: Path) -> None:
    """The CLI, the drill and the operations call typed client methods (transport/client.py,
    peer.py, agent.py), so the API's paths are known in one place on each side."""
    rel = str(path.relative_to(SRC))
    if rel.startswith(API_PATHS_ALLOWED):
        return
    lines = api_path_literals(path)
    assert not lines, f"{rel} writes an /api/v1 path on line(s) {lines}: add a client method"
