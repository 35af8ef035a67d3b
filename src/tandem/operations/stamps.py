"""What a production volume holds: the image it was last captured as or restored from,
with the file's stamp at that moment (``tandem.storage.volume.SourceStamp``).

A restore hands both to the agent, which restores from that image as a base — reading
nothing of the target — when the stamp still matches, and compares the whole target when it
does not. So the record may be stale without harm, never wrong in a way that loses data:
it is replaced after every volume capture and restore, and dropped when a restore fails
midway (the target then holds neither image).

Stored as a catalog setting under the app's id: ``stamp:APP_ID`` → JSON
``{"manifest": HEX, "stamp": {...}}``.
"""

from __future__ import annotations

import json
from typing import Any

from tandem.catalog import queries as q
from tandem.operations.site import Site


def _key(app_id: str) -> str:
    return f"stamp:{app_id}"


def record(site: Site, *, app_id: str, manifest: str, stamp: dict[str, Any] | None) -> None:
    """The volume now holds ``manifest`` and looks like ``stamp`` (``None``: unknown)."""
    value = json.dumps({"manifest": manifest, "stamp": stamp}) if stamp else ""
    with site.catalog.begin() as session:
        q.set_setting(session, key=_key(app_id), value=value)


def forget(site: Site, *, app_id: str) -> None:
    with site.catalog.begin() as session:
        q.set_setting(session, key=_key(app_id), value="")


def known(site: Site, *, app_id: str) -> tuple[str, dict[str, Any]] | None:
    """(manifest, stamp) last recorded for the app's volume, if any."""
    with site.catalog.read() as session:
        value = q.get_setting(session, key=_key(app_id))
    if not value:
        return None
    doc = json.loads(value)
    return str(doc["manifest"]), dict(doc["stamp"])
