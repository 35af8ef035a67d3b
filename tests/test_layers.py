"""DESIGN.md's layers: a module may import only from layers above it in the list."""

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
    "cli",
]
# Siblings that may not import each other although they are both low enough.
FORBIDDEN = {("storage", "catalog"), ("agent", "appliance"), ("appliance", "agent")}


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
