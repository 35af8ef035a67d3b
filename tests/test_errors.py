"""The exception tree (errors.py): every class formats with its fields, says the fix, and
carries an HTTP status and an exit code."""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

import pytest

from tandem import errors
from tandem.errors import TandemError

CLASSES = sorted(
    (c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, TandemError)),
    key=lambda c: c.__name__,
)
CATCH_ALLS = {"TandemError", "InvalidInput", "Conflict", "StorageError", "RemoteError"}
"""Classes whose message is the detail a raise site gives (the fix is in the detail);
every other class's own template names the fix, or takes it as its ``{fix}`` field."""
REASON_IS_THE_FIX = {"TargetInvalid", "TransitionRefused"}
"""Older classes whose ``{reason}`` says what to do (each raise site words it): to be split
into classes of their own like the ones at the end of errors.py."""


def fields_of(cls: type[TandemError]) -> dict[str, object]:
    """A value for each field the class's template names (numbers where it formats one)."""
    out: dict[str, object] = {}
    for _, name, spec, _ in string.Formatter().parse(cls.__doc__ or ""):
        if name:
            out[name] = 1.5 if spec else f"<{name}>"
    return out


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_formats_with_its_fields(cls: type[TandemError]) -> None:
    fields = fields_of(cls)
    exc = cls(**fields)
    assert exc.message and "{" not in exc.message, exc.message
    for name in fields:
        assert name in exc.fields
    assert exc.code == cls.__name__
    assert 400 <= cls.http_status < 600
    assert cls.exit_code in (1, 2)


@pytest.mark.parametrize(
    "cls",
    [c for c in CLASSES if c.__name__ not in CATCH_ALLS | REASON_IS_THE_FIX],
    ids=lambda c: c.__name__,
)
def test_every_error_ends_with_what_to_do(cls: type[TandemError]) -> None:
    """The house style: the template says what is wrong, then (its last sentence) the fix."""
    template = " ".join((cls.__doc__ or "").split())
    if template.rstrip(".").endswith("{fix}"):
        return  # the raise site gives the fix
    sentences = re.split(r"(?<=[.;])\s+(?=[A-Z`(])", template)
    assert len(sentences) >= 2, f"{cls.__name__}: {template}"
    assert template.endswith((".", ")", "`")), f"{cls.__name__}: {template}"


def test_an_operator_condition_keeps_the_status_of_the_catch_all_it_refines() -> None:
    """Callers and clients that catch InvalidInput or Conflict still catch the new classes."""
    for cls in CLASSES:
        if issubclass(cls, errors.InvalidInput):
            assert cls.http_status == 422 and cls.exit_code == 2, cls
        if issubclass(cls, errors.Conflict):
            assert cls.http_status == 409, cls


SRC = Path(errors.__file__).parent
CATCH_ALL_CALLS = {"TandemError", "InvalidInput", "Conflict", "StorageError"}
CATCH_ALL_BUDGET: dict[str, int] = {
    # Checks of what the appliance, an agent or a peer sent (tandem's own code never sends
    # it): framing, digests, block indices, URIs, request fields the other side always fills.
    "transport/wire.py": 8,
    "appliance/routes_sessions.py": 4,  # wire checks of the senders' batches
    "agent/actions.py": 4,
    "agent/pg.py": 1,  # a WAL segment the appliance sent larger than a segment
    "agent/diskmount.py": 2,
    "agent/vm.py": 6,
    "domain/hooks.py": 4,
    "operations/wal.py": 5,
    "operations/replicate.py": 1,
    "operations/failback.py": 1,
    "operations/sessions.py": 1,
    # A validation message echoed (pydantic's, or ``path_problem``'s, which names the fix).
    "transport/api.py": 1,
    "transport/server.py": 1,
    "domain/paths.py": 1,
    # Programming invariants ("cannot happen") and OSError translated at the boundary.
    "storage/overlay.py": 20,
    "storage/pool.py": 2,
    "storage/vmimage.py": 2,
    "storage/volume.py": 1,
    "operations/present.py": 1,  # a volume app's image whose manifest is not a volume's
    "appliance/nbd.py": 3,
    "agent/fusemount.py": 1,
    "domain/jobs.py": 1,
    "jobs/queue.py": 1,
    "operations/syncback.py": 4,
    "operations/replica_failback.py": 1,
    "transport/client.py": 1,
    "drill/lab.py": 4,
}
"""Raise sites of the catch-alls left, per module (issue #13 item 6). Every condition an
operator meets has a class of its own in errors.py; lower a budget when a site goes."""


def catch_all_sites() -> dict[str, list[int]]:
    """Module (relative to the package) -> lines that construct a catch-all error."""
    found: dict[str, list[int]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in CATCH_ALL_CALLS:
                found.setdefault(module, []).append(node.lineno)
    return found


def test_catch_alls_are_left_only_where_no_operator_meets_them() -> None:
    over = {
        module: lines
        for module, lines in catch_all_sites().items()
        if len(lines) > CATCH_ALL_BUDGET.get(module, 0)
    }
    assert not over, (
        "new raise sites of a catch-all error (TandemError, InvalidInput(detail=…), "
        f"Conflict(detail=…), StorageError(detail=…)): {over}. Give the condition a class in "
        "errors.py whose message names the fix (subclass the catch-all to keep its status); "
        "only a programming invariant or a wire check may raise a catch-all (then raise its "
        "budget here)"
    )
