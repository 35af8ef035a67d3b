"""The typed parameters of a job: what its submit function decided, what its run reads.

Invariants
- A job's parameters are stored as a JSON object in its catalog row (``Job.params``), so a
  job queued by an older version, or resumed after a restart, still loads: a model's fields
  are the keys the job has ever been stored with, new ones have defaults.
- A submit function builds the model (``extra="forbid"``: a misspelt key fails at once)
  and stores ``stored()``; the run function gets the model back from ``of(job)``. A row
  that does not validate fails the job with ``JobParamsInvalid`` before anything is done.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from tandem.errors import JobParamsInvalid
from tandem.jobs.runner import JobInfo


class JobParams(BaseModel):
    """The base of every operation's ``Params``: no key but the declared ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def stored(self) -> dict[str, Any]:
        """The JSON object the catalog row keeps (fields left at their default omitted)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @classmethod
    def of(cls, job: JobInfo) -> Self:
        """The parameters of ``job``, validated; ``JobParamsInvalid`` naming the bad keys."""
        try:
            return cls.model_validate(dict(job.params))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
                for err in exc.errors()
            )
            raise JobParamsInvalid(job=job.id, type=job.type, problems=problems) from None


class NoParams(JobParams):
    """A job that takes nothing but its app or image (delete-image, replicate)."""


class ForceParams(JobParams):
    """A job that may be forced past a safety check (failback, commit-failback, gc)."""

    force: bool = False


class LabelParams(JobParams):
    """A job that makes an image with an optional label (capture, syncback)."""

    label: str | None = None
