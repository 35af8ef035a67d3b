"""What an operation that runs as a job declares about itself (``Spec``), in its own module.

Each operation module holds its ``SPEC`` (or ``SPECS``, for a module with several);
``operations.registry`` collects them. An entry says what the operator calls the operation,
its job type, the typed parameters its job stores and its run function reads (``Params``),
the API call that starts it with its request model and the function that submits it from
that request, the lifecycle operation whose rule it obeys, and how the console offers it
(title, danger, confirmations).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from tandem.catalog.models import Job
from tandem.domain.lifecycle import Operation
from tandem.jobs.runner import Handler, JobContext
from tandem.operations.jobparams import JobParams
from tandem.operations.site import Site

Submit = Callable[[Site, str, Any, str | None], Job]
"""``submit(site, subject, request, actor)``: ``subject`` is the app's name, or the image's
id for an operation on an image (``Spec.subject``); ``request`` the API's request model, or
``None`` when the call has no body (or an optional body was not sent)."""


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One operation (see the module's docstring)."""

    name: str
    """What the operator calls it: the console's action, the CLI's command."""
    job_type: str
    params: type[JobParams]
    run: Callable[[Site, JobContext, Any], Mapping[str, Any] | None]
    """``run(site, ctx, params)``, ``params`` an instance of ``params``."""
    route: str
    """The API call that starts it, as ``METHOD /path`` under ``/api/v1``."""
    submit: Submit
    subject: Literal["app", "image", "site"]
    lifecycle: Operation | None
    """The lifecycle operation whose rule it obeys (none: housekeeping, or a job that reads
    an image and changes nothing: offered on every image that is not being deleted)."""
    request: type[BaseModel] | None = None
    """The API's request body (``None``: the call takes none)."""
    endpoint: str = ""
    """The API route's function name (its OpenAPI ``operationId``), when it is not
    ``<name>_<subject>`` (``start_gc``)."""
    tag: str = ""
    """The API route's tag, when it is not the subject's (``operations`` for an app,
    ``images`` for an image)."""
    summary: str | None = None
    """The API route's description (``None``: none)."""
    when: Callable[[Any], bool] | None = None
    """For a route several operations share: whether a request is this one's (the replica
    style of ``POST /apps/{name}/failback`` names a ``target``); the route asks the
    operations with ``when`` first, then the one without."""
    generic_route: bool = True
    """``False``: its route is written by hand elsewhere (``replicate``, a peer's call too)."""
    title: str | None = None
    """The console's title for it (``None``: the console does not offer it)."""
    danger: bool = False
    """The console shows it as destructive."""
    confirmations: tuple[str, ...] = ()
    """The phrases the operator types, in order (checked by the operation itself)."""
    command: str = ""
    """The CLI command that starts it, when it is not ``name`` (``image delete``)."""

    @property
    def cli(self) -> tuple[str, ...]:
        """The words of its CLI command after ``tandem``."""
        return tuple((self.command or self.name).split())

    @property
    def function(self) -> str:
        """The API route's function name (see ``endpoint``)."""
        return self.endpoint or f"{self.name}_{self.subject}".replace("-", "_")

    def handler(self, site: Site) -> Handler:
        """The runner's handler: the stored parameters validated, then ``run``."""

        def handle(ctx: JobContext) -> Mapping[str, Any] | None:
            return self.run(site, ctx, self.params.of(ctx.job))

        return handle
