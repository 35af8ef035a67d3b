"""The API's documents made from catalog rows: the route layer's adapter to the wire
contract of ``transport/api.py``.

A document is read from its row by field name (``_fields``, a plain dict); only what
differs is given here: fields named otherwise in the catalog, fields computed at the time
of the request (ages, risk) and what the caller may not see (a job's capabilities are shown
to its starter and to admins only, secrets in messages to nobody). A list is validated in
one pydantic call (``app_outs``): reading a thousand rows through ``from_attributes`` cost
more than the query behind them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any

from pydantic import TypeAdapter

from tandem.appliance.auth import Principal
from tandem.catalog.models import App, Image, Job, JobLog, Template
from tandem.domain.rules import Role
from tandem.operations.apps import Risk
from tandem.transport.api import (
    PG_FILES,
    AppOut,
    Document,
    GcOut,
    ImageOut,
    JobLogOut,
    JobOut,
    TemplateOut,
    hide_secrets,
    redact_capabilities,
)

_MISSING = object()


@cache
def _field_names(model: type[Document]) -> tuple[str, ...]:
    return tuple(model.model_fields)


def _fields(
    model: type[Document],
    row: object,
    over: Mapping[str, Any],
    renamed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``model``'s fields read from ``row`` by name (``renamed``: field → the row's name for
    it), those in ``over`` from there instead: what ``from_attributes`` does, as a dict one
    validation call takes a list of. A field neither has keeps its default.

    An ORM row's loaded columns are read from its ``__dict__``: the instrumented attribute
    behind each was most of the cost of a long list. Anything not loaded there (expired,
    or not a column) is read by attribute, as before."""
    loaded: dict[str, Any] = getattr(row, "__dict__", {})
    renamed = renamed or {}
    doc = {}
    for name in _field_names(model):
        if name in over:
            doc[name] = over[name]
            continue
        attr = renamed.get(name, name)
        value = loaded[attr] if attr in loaded else getattr(row, attr, _MISSING)
        if value is not _MISSING:
            doc[name] = value
    return doc


_APP_LIST = TypeAdapter(list[AppOut])


def may_see_capabilities(job: Job, who: Principal | None) -> bool:
    """Whether ``who`` may read the capabilities in ``job``'s result: admins, and the
    operator who started the job."""
    if who is None or who.role is Role.VIEWER or who.role is Role.PEER:
        return False
    return who.role is Role.ADMIN or (job.actor is not None and job.actor == who.name)


def _job_fields(job: Job, who: Principal | None) -> dict[str, Any]:
    result = job.result if may_see_capabilities(job, who) else redact_capabilities(job.result)
    return _fields(JobOut, job, {"message": hide_secrets(job.message), "result": result})


def job_out(job: Job, who: Principal | None = None) -> JobOut:
    """The document of ``job`` as ``who`` may see it (``None``: no capabilities)."""
    return JobOut.model_validate(_job_fields(job, who))


def job_log_out(line: JobLog) -> JobLogOut:
    return JobLogOut.model_validate(_fields(JobLogOut, line, {"text": hide_secrets(line.text)}))


def image_out(image: Image, window: dict[str, Any] | None = None) -> ImageOut:
    pg = {k: v for k, v in image.pg.items() if k not in PG_FILES} if image.pg else None
    over = {
        "app": image.app.name,
        "parent": image.parent_id,
        "nbd_uri": None,
        "nbd_exported": image.nbd_export is not None,
        "pg": pg,
        "window": window,
    }
    return ImageOut.model_validate(_fields(ImageOut, image, over))


def _up_to_ms(seconds: float) -> float:
    """An age in seconds to the millisecond, rounded up: an age is never shown younger
    than it is (an RPO just past its limit must not read as the limit)."""
    return math.ceil(round(seconds * 1000, 6)) / 1000  # round: no float noise rounds up


def _age(ts: datetime | None, now: datetime) -> float | None:
    return None if ts is None else _up_to_ms(max(0.0, (now - ts).total_seconds()))


_APP_RENAMED = {
    "start": "start_hook",
    "stop": "stop_hook",
    "freeze": "freeze_hook",
    "thaw": "thaw_hook",
    "epoch": "writer_epoch",
}


def _app_fields(
    app: App, now: datetime, downtime: float | None, risk: Risk | None
) -> dict[str, Any]:
    risk = risk or Risk(None, None, False, "the peer" if app.peer_active else None)
    over = {
        "lag_seconds": _age(app.last_capture, now),
        "replication_lag_seconds": _age(app.last_replicated, now),
        "failback_downtime_seconds": downtime,
        "rpo_seconds": None if risk.rpo_seconds is None else _up_to_ms(risk.rpo_seconds),
        "max_lag_seconds": risk.max_lag_seconds,
        "at_risk": risk.at_risk,
        "failed_over_at": risk.failed_over_at,
    }
    return _fields(AppOut, app, over, _APP_RENAMED)


def app_out(
    app: App,
    now: datetime | None = None,
    downtime: float | None = None,
    risk: Risk | None = None,
) -> AppOut:
    return AppOut.model_validate(_app_fields(app, now or datetime.now(UTC), downtime, risk))


def app_outs(
    apps: Iterable[App],
    now: datetime,
    downtimes: Mapping[str, float],
    risks: Mapping[str, Risk],
) -> list[AppOut]:
    """``app_out`` of each of ``apps`` (its failback downtime and risk looked up by name),
    validated in one call."""
    return _APP_LIST.validate_python(
        [_app_fields(a, now, downtimes.get(a.name), risks.get(a.name)) for a in apps]
    )


def template_out(template: Template, every: str | None, max_lag: str | None = None) -> TemplateOut:
    return TemplateOut.model_validate(
        _fields(TemplateOut, template, {"every": every, "max_lag": max_lag})
    )


def gc_out(doc: dict[str, Any]) -> GcOut:
    """The document of ``operations.gc.status``'s answer."""
    settings = doc["settings"]
    return GcOut(
        pending_deletions=doc["pending_deletions"],
        unfinished=doc["unfinished"],
        last_finished=doc["last_finished"],
        job=doc["job"],
        after_deletions=settings["gc.after_deletions"],
        every_seconds=settings["gc.every_seconds"],
        keep_job_days=settings["jobs.keep_days"],
        full_every_seconds=settings["gc.full_every_seconds"],
    )
