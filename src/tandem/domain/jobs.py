"""Job states and the transitions between them.

Invariants
- A job starts ``QUEUED``; a runner claims it (``RUNNING``); it ends in exactly one terminal
  state (``SUCCEEDED``, ``FAILED``, ``CANCELED``) and never leaves it.
- ``RUNNING -> QUEUED`` happens only when start-up recovery re-queues an interrupted job
  whose operation is idempotent (resume = run again).
- A queued job can be canceled at once; a running one only asks its operation to stop, and
  becomes ``CANCELED`` when the operation gives up (see ``tandem.jobs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from tandem.errors import Conflict, JobEnded


class JobStatus(StrEnum):
    """Where a job is; the values are the ``status`` field of the job JSON (CLI.md)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
)
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})

JOB_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


def check_job_transition(job_id: str, current: JobStatus, new: JobStatus) -> JobStatus:
    """Return ``new`` if a job may go from ``current`` to it; raise ``Conflict`` otherwise."""
    if new in JOB_TRANSITIONS[current]:
        return new
    if current in TERMINAL:
        raise JobEnded(job=job_id, status=current.value, action=f"become {new.value}")
    # Not terminal: a state the scheduler never moves a job between (a programming error).
    raise Conflict(detail=f"job {job_id} is {current.value}; it cannot become {new.value}")
