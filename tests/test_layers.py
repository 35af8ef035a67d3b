"""DESIGN.md's layers: a module may import only from layers above it in the list; and the
API's paths are written only where the wire contract and the routes are."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.appliance.conftest import Booted, booted
from tests.catalog.conftest import catalog_url

__all__ = ["booted", "catalog_url"]  # the fixtures the registry test needs

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


HTTP_CALLS = frozenset({"get", "post", "put", "patch", "delete", "request", "stream"})


def _is_path(node: ast.expr) -> bool:
    """A literal or f-string whose text starts with ``/``: a URL path being written."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value.startswith("/")
    if isinstance(node, ast.JoinedStr) and node.values:
        return _is_path(node.values[0])
    return False


def raw_http_calls(path: Path) -> list[int]:
    """Lines of ``path`` that call an HTTP client's ``get/post/…/request`` with a written
    path (``client.post(f"/api/v1/apps/{name}/capture", {...})``) instead of a method of a
    typed client. A route's decorator (``@router.get("/apps")``) declares a path: not a call."""
    tree = ast.parse(path.read_text())
    decorators = {
        id(d)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        for d in node.decorator_list
    }
    lines = []
    for node in ast.walk(tree):
        if id(node) in decorators or not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in HTTP_CALLS
        ):
            continue
        args = node.args[1:2] if node.func.attr == "request" else node.args[:1]
        if any(_is_path(a) for a in args):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_http_calls_with_written_paths_are_only_in_transport(path: Path) -> None:
    """Outside transport/ (the typed clients) and the daemons' own routes, a request is a
    client method: ``api.capture(app, body)``, never ``client.post("/…", {...})``."""
    rel = str(path.relative_to(SRC))
    if rel.startswith(API_PATHS_ALLOWED):
        return
    lines = raw_http_calls(path)
    assert not lines, f"{rel} calls a URL path directly on line(s) {lines}: add a client method"


def test_the_raw_call_rule_sees_a_raw_call(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        'api.post(f"/api/v1/apps/{name}/capture", {})\n'
        'api.request("PATCH", "/api/v1/gc", json_body={})\n'
        'client.get("/health")\n'
        'params.get("key")\n'
        '@router.get("/apps")\n'  # a route declares its path
        "def apps(): ...\n"
    )
    assert raw_http_calls(sample) == [1, 2, 3]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_api_paths_are_written_only_in_transport_and_the_routes(path: Path) -> None:
    """The CLI, the drill and the operations call typed client methods (transport/client.py,
    peer.py, agent.py), so the API's paths are known in one place on each side."""
    rel = str(path.relative_to(SRC))
    if rel.startswith(API_PATHS_ALLOWED):
        return
    lines = api_path_literals(path)
    assert not lines, f"{rel} writes an /api/v1 path on line(s) {lines}: add a client method"


# --- the operation registry: one entry, every place ------------------------------------------


def test_every_lifecycle_operation_but_protection_is_registered() -> None:
    from tandem.domain.lifecycle import Operation
    from tandem.operations.registry import BY_OPERATION

    unregistered = set(Operation) - set(BY_OPERATION) - {Operation.PROTECT, Operation.UNPROTECT}
    assert not unregistered, f"add an entry to operations/registry.py for {unregistered}"


def test_every_registered_operation_has_a_handler_a_route_and_a_console_form(
    booted: Booted,
) -> None:
    """Removing an operation from the runner's handlers, from the API's routes or from the
    console (its title, handler or form on the Access page) fails here."""
    from tandem.appliance import console
    from tandem.operations.registry import REGISTRY

    appliance = booted.appliance
    routes = {
        f"{method.upper()} {path}"
        for path, calls in appliance.app.openapi()["paths"].items()
        for method in calls
    }
    access = (SRC / "appliance" / "templates" / "access.html").read_text()
    for spec in REGISTRY:
        assert spec.job_type in appliance.runner.handlers, f"{spec.name}: no job handler"
        method, path = spec.route.split(" ", 1)
        assert f"{method} /api/v1{path}" in routes, f"{spec.name}: no API route {spec.route}"
        if spec.title is None:
            continue  # housekeeping (gc, replicate): not offered on the console
        assert console.TITLES[spec.name] == spec.title
        assert spec.name in console.HANDLERS, f"{spec.name}: the console cannot run it"
        if spec.name == "capture":
            continue  # capture's form is the app's own, above the timeline
        if f"a.name == '{spec.name}'" not in access:  # no block of its own: a made one
            assert "a.fields" in access, f"{spec.name}: no form on the page"
            assert console.form_fields(spec.request) is not None


def test_every_registered_operation_has_a_cli_command() -> None:
    """Removing the CLI command that starts an operation fails here."""
    import typer

    from tandem.cli.main import build_app
    from tandem.operations.registry import REGISTRY

    for spec in REGISTRY:
        command = typer.main.get_command(build_app(spec.cli[0]))
        ctx = command.make_context("tandem", [], resilient_parsing=True)
        for word in spec.cli:
            assert hasattr(command, "get_command"), f"{spec.name}: `{word}` is not a group"
            found = command.get_command(ctx, word)
            assert found is not None, f"{spec.name}: no CLI command `tandem {' '.join(spec.cli)}`"
            command = found


def test_every_route_the_cli_starts_by_name_is_declared_by_an_operation() -> None:
    """``ApplianceClient.start("METHOD /path", …)`` names its route as a string (the CLI does not
    import the operations layer): a route renamed in a ``Spec`` and not in the CLI fails here."""
    from tandem.operations.registry import REGISTRY

    routes = {spec.route for spec in REGISTRY}
    started = [
        (path.relative_to(SRC), match.group(1))
        for path in sorted((SRC / "cli").rglob("*.py"))
        for match in re.finditer(r"\.start\(\s*\"([A-Z]+ [^\"]+)\"", path.read_text())
    ]
    assert started, "the pattern no longer finds the CLI's generic job starts"
    unknown = [f"{path}: {route}" for path, route in started if route not in routes]
    assert not unknown, f"routes no operation declares: {unknown}"
