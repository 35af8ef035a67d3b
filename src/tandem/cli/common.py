"""Options and helpers every API command shares: where the daemon is, and how to render.

The appliance is named by ``--url``, ``--token`` and ``--fingerprint`` or the
``TANDEM_URL``, ``TANDEM_TOKEN`` and ``TANDEM_FINGERPRINT`` environment variables. Commands
whose own ``--url/--token/--fingerprint`` name another daemon (``tandem host add`` names the
agent) take the appliance as ``--appliance-url`` etc., with the same environment variables.

Ids and names typed on the command line are checked against the shapes of
``tandem.domain.ids`` before anything is sent: a value that cannot be an image id is "no such
image", never a path to some other resource.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tandem.domain.ids import is_image_id, is_job_id, validate_name
from tandem.errors import InvalidInput, NotFound
from tandem.transport.client import ApiClient

Url = Annotated[
    str | None,
    typer.Option("--url", envvar="TANDEM_URL", help="Appliance URL.", show_default=False),
]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="TANDEM_TOKEN", help="API token.", show_default=False),
]
Fingerprint = Annotated[
    str | None,
    typer.Option(
        "--fingerprint",
        envvar="TANDEM_FINGERPRINT",
        help="SHA-256 of the appliance's certificate, as `init` printed it.",
        show_default=False,
    ),
]
ApplianceUrl = Annotated[
    str | None,
    typer.Option("--appliance-url", envvar="TANDEM_URL", help="Appliance URL.", show_default=False),
]
ApplianceToken = Annotated[
    str | None,
    typer.Option(
        "--appliance-token", envvar="TANDEM_TOKEN", help="Appliance API token.", show_default=False
    ),
]
ApplianceFingerprint = Annotated[
    str | None,
    typer.Option(
        "--appliance-fingerprint",
        envvar="TANDEM_FINGERPRINT",
        help="SHA-256 of the appliance's certificate.",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document.")]
NoWait = Annotated[bool, typer.Option("--no-wait", help="Return at once with the job.")]


def connect(url: str | None, token: str | None, fingerprint: str | None) -> ApiClient:
    """A client for the appliance (close it, or use it as a context manager)."""
    if not url:
        raise InvalidInput(detail="no appliance given: pass --url or set TANDEM_URL")
    if not token:
        raise InvalidInput(detail="no token given: pass --token or set TANDEM_TOKEN")
    return ApiClient(url, token, fingerprint, what="appliance")


def checked_image(image: str) -> str:
    """``image`` if it has the shape of an image id; otherwise there is no such image."""
    if not is_image_id(image):
        raise NotFound(what="image", name=image, listing="images APP")
    return image


def checked_job(job: str) -> str:
    """``job`` if it has the shape of a job id; otherwise there is no such job."""
    if not is_job_id(job):
        raise NotFound(what="job", name=job, listing="jobs")
    return job


def checked_app(app: str) -> str:
    """``app`` if it is a valid application name (one that can exist)."""
    try:
        return validate_name(app, "application name")
    except InvalidInput:
        raise NotFound(what="application", name=app, listing="apps") from None
