"""The job handlers of this appliance, by job type, bound to its ``Site``."""

from __future__ import annotations

from tandem.jobs.runner import Handler
from tandem.operations.registry import REGISTRY
from tandem.operations.site import Site


def job_handlers(site: Site) -> dict[str, Handler]:
    """One handler per registered operation: its stored parameters validated, then run."""
    return {spec.job_type: spec.handler(site) for spec in REGISTRY}
