"""The job handlers of this appliance, by job type, bound to its ``Site``."""

from __future__ import annotations

from functools import partial

from tandem.jobs.runner import Handler
from tandem.operations import capture, images, replicate, restore
from tandem.operations.site import Site


def job_handlers(site: Site) -> dict[str, Handler]:
    return {
        capture.TYPE: partial(capture.run_capture, site),
        restore.TYPE: partial(restore.run_restore, site),
        images.DELETE_TYPE: partial(images.run_delete, site),
        replicate.TYPE: partial(replicate.run_replicate, site),
    }
