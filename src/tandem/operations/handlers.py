"""The job handlers of this appliance, by job type, bound to its ``Site``."""

from __future__ import annotations

from functools import partial

from tandem.jobs.runner import Handler
from tandem.operations import (
    capture,
    clone,
    failback,
    failover,
    gc,
    images,
    mount,
    replica_failback,
    replicate,
    restore,
    syncback,
    testfailover,
)
from tandem.operations.site import Site


def job_handlers(site: Site) -> dict[str, Handler]:
    return {
        capture.TYPE: partial(capture.run_capture, site),
        restore.TYPE: partial(restore.run_restore, site),
        gc.TYPE: partial(gc.run_gc, site),
        images.DELETE_TYPE: partial(images.run_delete, site),
        replicate.TYPE: partial(replicate.run_replicate, site),
        testfailover.TYPE: partial(testfailover.run_test_failover, site),
        failover.TYPE: partial(failover.run_failover, site),
        mount.TYPE: partial(mount.run_mount, site),
        clone.TYPE: partial(clone.run_clone, site),
        syncback.TYPE: partial(syncback.run_syncback, site),
        failback.TYPE: partial(failback.run_failback, site),
        replica_failback.TYPE: partial(replica_failback.run_replica_failback, site),
        replica_failback.COMMIT_TYPE: partial(replica_failback.run_commit, site),
        replica_failback.UNDO_TYPE: partial(replica_failback.run_undo, site),
    }
