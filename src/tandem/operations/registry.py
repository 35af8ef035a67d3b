"""Every operation that runs as a job, collected from the modules that declare them.

An operation module declares its ``SPEC`` (or ``SPECS``) with ``operations.spec.Spec``; this
module finds them in the ``tandem.operations`` package, so a new operation touches its own
module (and its CLI command), nothing here.

Invariants
- ``handlers.job_handlers`` (the runner's table), the API's routes (``routes_ops``), the
  console's titles, dangers, forms and action handlers are all read from ``REGISTRY``;
  ``tests/test_layers.py`` checks that every entry has a handler, an API route, a console
  form (when titled) and a CLI command.
- ``REGISTRY`` is in a stable order: the lifecycle's (``domain.lifecycle.Operation``), then
  the operations outside it by name. Two modules declaring one name fail at import.
- A job's run function gets its parameters validated (``Spec.params.of``): a stored row
  that does not validate fails the job before anything is touched (``JobParamsInvalid``).
- ``submit`` takes the API's own request model, so the API and the console (whose forms are
  validated with the same model) start an operation the same way and are refused with the
  same message.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping

import tandem.operations
from tandem.domain.lifecycle import Operation
from tandem.operations.spec import Spec

__all__ = ["BY_NAME", "BY_OPERATION", "REGISTRY", "Spec"]

_NOT_OPERATIONS = frozenset({"registry", "handlers", "spec"})
"""Modules of the package that declare no operation (and import this one)."""
_LIFECYCLE = list(Operation)


def _declared() -> Iterator[Spec]:
    for info in pkgutil.iter_modules(tandem.operations.__path__):
        if info.name in _NOT_OPERATIONS:
            continue
        module = importlib.import_module(f"tandem.operations.{info.name}")
        single = getattr(module, "SPEC", None)
        if isinstance(single, Spec):
            yield single
        yield from getattr(module, "SPECS", ())


def _order(spec: Spec) -> tuple[int, str]:
    rank = _LIFECYCLE.index(spec.lifecycle) if spec.lifecycle is not None else len(_LIFECYCLE)
    return rank, spec.name


def _collect() -> tuple[Spec, ...]:
    found = sorted(_declared(), key=_order)
    names = [spec.name for spec in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RuntimeError(f"operations declared twice: {', '.join(twice)}")
    return tuple(found)


REGISTRY: tuple[Spec, ...] = _collect()
BY_NAME: Mapping[str, Spec] = {spec.name: spec for spec in REGISTRY}
BY_OPERATION: Mapping[Operation, Spec] = {
    spec.lifecycle: spec for spec in REGISTRY if spec.lifecycle is not None
}
