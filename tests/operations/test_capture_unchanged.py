"""An unchanged volume file is captured again without being read; any change, even one
that puts the old mtime back, is read."""

from __future__ import annotations

import os
from pathlib import Path

from tandem.catalog import queries as q
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.operations import capture
from tests.operations.conftest import Live
from tests.operations.test_capture_restore import protect, run

MiB = 1024 * 1024
PAST_NS = 10**18  # 2001: an mtime no stamp calls racy


def test_an_untouched_volume_is_not_read_again(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(3 * MiB) + bytes(2 * MiB))
    os.utime(path, ns=(PAST_NS, PAST_NS))
    protect(live, "disk", AppKind.VOLUME, path)

    first = run(live, capture.submit_capture(site, app="disk", actor="t"))
    assert first.status is JobStatus.SUCCEEDED, first.message
    assert first.result is not None and first.result["stats"]["bytes_read"] == 5 * MiB

    again = run(live, capture.submit_capture(site, app="disk", actor="t"))
    assert again.status is JobStatus.SUCCEEDED, again.message
    assert again.result is not None
    assert again.result["stats"]["bytes_read"] == 0  # not read: its stamp is the base's
    assert again.result["manifest"] == first.result["manifest"]
    assert again.result["consistency"] == first.result["consistency"]
    with site.catalog.read() as session:
        image = q.get_image(session, image_id=again.image or "")
        assert (image.parent_id, image.size) == (first.image, 5 * MiB)

    # Rewritten in place with the same size, then its old mtime put back (as `cp -p` or
    # `touch -d` do): the ctime moved, so the file is read.
    with open(path, "r+b") as fh:
        fh.write(b"changed")
    os.utime(path, ns=(PAST_NS, PAST_NS))
    third = run(live, capture.submit_capture(site, app="disk", actor="t"))
    assert third.status is JobStatus.SUCCEEDED, third.message
    assert third.result is not None and third.result["stats"]["bytes_read"] == 5 * MiB
    assert third.result["manifest"] != first.result["manifest"]
