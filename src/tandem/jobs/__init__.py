"""Jobs: every operation runs as a persistent, observable, cancelable job.

``tandem.jobs.queue`` holds the queue (rows of the catalog) and ``tandem.jobs.runner`` the
threads that run them; see their docstrings for the invariants.
"""

from tandem.jobs.queue import (
    INTERRUPTED_MESSAGE,
    cancel_job,
    claim_next,
    finish_job,
    recover_jobs,
    submit_job,
)
from tandem.jobs.runner import Handler, JobContext, JobInfo, JobRunner

__all__ = [
    "INTERRUPTED_MESSAGE",
    "Handler",
    "JobContext",
    "JobInfo",
    "JobRunner",
    "cancel_job",
    "claim_next",
    "finish_job",
    "recover_jobs",
    "submit_job",
]
