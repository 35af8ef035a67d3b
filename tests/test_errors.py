"""The exception tree (errors.py): every class formats with its fields, says the fix, and
carries an HTTP status and an exit code."""

from __future__ import annotations

import re
import string

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
