"""Backup templates: how often to capture, how many snapshots to keep, whether to mirror.

``every`` is written like ``30s``, ``15m``, ``1h``, ``1d`` or combinations (``1h30m``); a
bare number is seconds. Intervals run from 1 second to 366 days. ``max_lag`` (same
spelling) is the RPO past which the template's apps are shown *at risk*
(``operations.apps.risk_of``).
"""

from __future__ import annotations

import re

from tandem.catalog import queries as q
from tandem.catalog.models import Template
from tandem.errors import IntervalInvalid, OutOfRange
from tandem.operations.site import Site

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d{1,9})([smhd])")
MAX_EVERY = 366 * 86400
MAX_KEEP = 100_000


def parse_every(text: str, option: str = "--every") -> int:
    """Seconds in an interval such as ``15m`` or ``1h30m``; raises ``InvalidInput`` naming
    ``option``."""
    spec = text.strip().lower()
    if spec.isdigit() and len(spec) <= 9:
        seconds = int(spec)
    else:
        parts = _PART.findall(spec)
        if not parts or "".join(n + u for n, u in parts) != spec:
            raise IntervalInvalid(option=option, text=text)
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if not 1 <= seconds <= MAX_EVERY:
        raise OutOfRange(what=option, value=text, allowed="an interval between 1s and 366d")
    return seconds


def format_every(seconds: int | None) -> str | None:
    """The shortest spelling of an interval (``900`` -> ``15m``)."""
    if seconds is None:
        return None
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            n, seconds = divmod(seconds, size)
            out += f"{n}{unit}"
    return out or "0s"


def add_template(
    site: Site,
    *,
    name: str,
    every: str | None,
    keep: int | None,
    mirror: bool,
    max_lag: str | None = None,
) -> Template:
    every_seconds = parse_every(every) if every is not None else None
    max_lag_seconds = parse_every(max_lag, "--max-lag") if max_lag is not None else None
    if keep is not None and not 1 <= keep <= MAX_KEEP:
        raise OutOfRange(what="--keep", value=keep, allowed=f"a number from 1 to {MAX_KEEP}")
    with site.catalog.begin() as session:
        return q.add_template(
            session,
            name=name,
            every_seconds=every_seconds,
            keep=keep,
            mirror=mirror,
            max_lag_seconds=max_lag_seconds,
        )


def list_templates(site: Site) -> list[Template]:
    with site.catalog.read() as session:
        return q.list_templates(session)


def get_template(site: Site, *, name: str) -> Template:
    with site.catalog.read() as session:
        return q.get_template(session, name=name)


def remove_template(site: Site, *, name: str) -> None:
    with site.catalog.begin() as session:
        q.remove_template(session, name=name)
