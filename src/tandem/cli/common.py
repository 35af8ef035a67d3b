"""The one place that opens the appliance for a command and decides how it renders.

Like borg's ``with_repository``: a command is a plain function whose first parameter is a
``Session`` (the open appliance client and the output mode); ``api_command`` adds the
connection options to its command line, opens the client once, injects the session, closes
it, and turns errors into one line and an exit status. ``job_command`` does the same for a
command that starts a job: the function builds the operation's parameters and starts it,
returning the appliance's answer; the decorator adds ``--no-wait`` and follows the job
(progress on stderr, the exit status it implies, the JSON of CLI.md). A new job command::

    @job_command
    def capture(s: Session, app: AppName, label: Label = None) -> JobAnswer:
        \"\"\"Capture a snapshot of APP now.\"\"\"
        return s.api.capture(checked_app(app), checked(CaptureIn, label=label))

Where the appliance is: ``--url``, ``--token`` and ``--fingerprint`` after the command name,
else the same options before it (``tandem --url … apps``, the root callback), else the
``TANDEM_URL``, ``TANDEM_TOKEN`` and ``TANDEM_FINGERPRINT`` environment variables. ``--json``
may stand on either side too. Commands whose own ``--url/--token/--fingerprint`` name another
daemon (``tandem host add`` names the agent, ``tandem peer add`` the peer) take the appliance
as ``--appliance-url`` etc. (``api_command(flags=APPLIANCE_FLAGS)``).

Ids and names typed on the command line are checked against the shapes of
``tandem.domain.ids`` before anything is sent: a value that cannot be an image id is "no such
image", never a path to some other resource.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Concatenate, ParamSpec, get_type_hints, overload

import typer

# typer 0.29 vendors click; the context of the running command lives in this (private) module.
from typer._click.globals import get_current_context

from tandem.domain.ids import is_image_id, is_job_id, validate_name
from tandem.errors import ConnectionOptionMissing, InvalidInput, NotFound, RemoteError
from tandem.transport.api import JobAnswer

from .output import emit_json, handle_errors, plain, stdout
from .startup import hidden, import_http_client

with hidden("httpx._main"):  # httpx's own CLI: see tandem.cli.startup
    from tandem.transport.client import ApiClient, ApplianceClient, Doc

if TYPE_CHECKING:  # Rich is imported when a table is made (tandem.cli.output)
    from rich.table import Table

P = ParamSpec("P")

Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document.")]
NoWait = Annotated[bool, typer.Option("--no-wait", help="Return at once with the job.")]


# --- where the appliance is -----------------------------------------------------------------


@dataclass
class Target:
    """The appliance and output mode as the root callback's options (or the environment)
    gave them; a command's own options win."""

    url: str | None = None
    token: str | None = None
    fingerprint: str | None = None
    json: bool = False


def _option(flag: str, env: str | None, text: str) -> Any:
    return typer.Option(flag, envvar=env, help=text, show_default=False)


_URL_HELP = "Appliance URL (or TANDEM_URL)."
_TOKEN_HELP = "API token (or TANDEM_TOKEN)."
_FP_HELP = "SHA-256 of the appliance's certificate, as `init` printed it (or TANDEM_FINGERPRINT)."


def root_options(
    ctx: typer.Context,
    url: Annotated[str | None, _option("--url", "TANDEM_URL", _URL_HELP)] = None,
    token: Annotated[str | None, _option("--token", "TANDEM_TOKEN", _TOKEN_HELP)] = None,
    fingerprint: Annotated[
        str | None, _option("--fingerprint", "TANDEM_FINGERPRINT", _FP_HELP)
    ] = None,
    json_: Json = False,
) -> None:
    """tandem: two-site disaster recovery."""
    ctx.obj = Target(url, token, fingerprint, json_)


def _root_target() -> Target:
    """What the root callback was given; the environment alone when it did not run (a
    command called on its own)."""
    ctx = get_current_context(silent=True)
    root = ctx.find_root().obj if ctx is not None else None
    if isinstance(root, Target):
        return root
    env = os.environ
    return Target(env.get("TANDEM_URL"), env.get("TANDEM_TOKEN"), env.get("TANDEM_FINGERPRINT"))


def json_mode(json_: bool) -> bool:
    """Whether this command prints JSON: its own ``--json`` or the root's."""
    return json_ or _root_target().json


@dataclass(frozen=True)
class Flags:
    """The option names a command takes the appliance by."""

    url: str
    token: str
    fingerprint: str


FLAGS = Flags("--url", "--token", "--fingerprint")
APPLIANCE_FLAGS = Flags("--appliance-url", "--appliance-token", "--appliance-fingerprint")

_INJECTED = ("url_", "token_", "fingerprint_", "json_")


def _connection_params(flags: Flags) -> list[inspect.Parameter]:
    """The options every API command takes after its name (no envvar here: the root
    callback reads the environment, so ``tandem --url X cmd`` beats TANDEM_URL)."""
    kw = inspect.Parameter.KEYWORD_ONLY

    def opt(name: str, flag: str, text: str) -> inspect.Parameter:
        kind = Annotated[str | None, typer.Option(flag, help=text, show_default=False)]
        return inspect.Parameter(name, kw, default=None, annotation=kind)

    return [
        opt("url_", flags.url, _URL_HELP),
        opt("token_", flags.token, _TOKEN_HELP),
        opt("fingerprint_", flags.fingerprint, _FP_HELP),
        inspect.Parameter("json_", kw, default=False, annotation=Json),
    ]


def connect(url: str | None, token: str | None, fingerprint: str | None) -> ApplianceClient:
    """A client for the appliance (close it, or use it as a context manager)."""
    if not url:
        raise ConnectionOptionMissing(what="appliance", option="--url", env="TANDEM_URL")
    if not token:
        raise ConnectionOptionMissing(what="token", option="--token", env="TANDEM_TOKEN")
    import_http_client()
    return ApplianceClient(url, token, fingerprint)


# --- the session a command gets ----------------------------------------------------------


class Session:
    """One command's open appliance (``api``) and output mode (``json``)."""

    def __init__(self, api: ApplianceClient, json_: bool) -> None:
        self.api = api
        self.json = json_

    def emit(self, doc: Doc, render: Callable[[Doc], object] | None = None) -> None:
        """``doc`` as the one JSON document, or rendered for people (``render(doc)`` returns
        something Rich prints, or prints itself and returns None)."""
        doc = plain(doc)
        if self.json:
            emit_json(doc)
        elif render is not None:
            shown = render(doc)
            if shown is not None:
                stdout.print(shown)

    def show(self, doc: Doc, keys: Iterable[str]) -> None:
        """One object: a ``key value`` line per key (or the JSON document)."""
        doc = plain(doc)
        if self.json:
            emit_json(doc)
            return
        for key in keys:
            value = doc.get(key)
            stdout.print(f"{key:13} {'' if value is None else value}", highlight=False)

    def table(self, rows: Sequence[Any], keys: Iterable[str]) -> None:
        """A list of objects as a table with these columns (or the JSON document)."""
        docs: list[dict[str, Any]] = plain(list(rows))
        if self.json:
            emit_json(docs)
            return
        stdout.print(table_of(docs, tuple(keys)))

    def follow(self, answer: JobAnswer, *, no_wait: bool) -> None:
        """End a job-starting command: wait for the job unless ``no_wait``, then render it."""
        from .jobs import follow_job  # the Monitor's rendering; it imports this module

        follow_job(self.api, job_of(self.api, plain(answer)), json_=self.json, no_wait=no_wait)


def table_of(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD)
    for key in keys:
        table.add_column(key, no_wrap=key in ("name", "id"), overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(k) is None else str(row.get(k)) for k in keys))
    return table


def job_of(client: ApiClient, answer: Any) -> dict[str, Any]:
    """The job an operation's answer ``{"job": {...}}`` carries; a clear error otherwise."""
    job = answer.get("job") if isinstance(answer, dict) else None
    if not isinstance(job, dict) or not {"id", "type", "status"} <= job.keys():
        shown = str(answer)[:200]
        raise RemoteError(
            what=client.what,
            name=client.name,
            detail=f"it answered {shown} where a job was expected; check the id or name you "
            "gave and that this tandem matches the appliance's version",
        )
    return job


# --- the decorators ------------------------------------------------------------------------


NO_WAIT = inspect.Parameter(
    "no_wait", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=NoWait
)


def _command(fn: Callable[..., Any], flags: Flags, *, follow: bool) -> Callable[..., None]:
    """``fn(session, …)`` as a Typer command: its own parameters but the first, then
    ``--no-wait`` if it starts a job (``follow``), then the connection options."""
    hints = get_type_hints(fn, include_extras=True)
    own = list(inspect.signature(fn).parameters.values())[1:]
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
    extra = [NO_WAIT] if follow else []
    params = [*own, *extra, *_connection_params(flags)]
    if {p.name for p in own} & {*_INJECTED, *(p.name for p in extra)}:
        raise TypeError(f"{fn.__name__}: a parameter's name is one the decorator adds")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        root = _root_target()
        url = kwargs.pop("url_", None) or root.url
        token = kwargs.pop("token_", None) or root.token
        fingerprint = kwargs.pop("fingerprint_", None) or root.fingerprint
        json_ = bool(kwargs.pop("json_", False)) or root.json
        no_wait = bool(kwargs.pop(NO_WAIT.name, False))
        with connect(url, token, fingerprint) as api:
            session = Session(api, json_)
            result = fn(session, *args, **kwargs)
            if follow:
                session.follow(result, no_wait=no_wait)

    wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return handle_errors(wrapper)


@overload
def api_command(fn: Callable[Concatenate[Session, P], object]) -> Callable[..., None]: ...


@overload
def api_command(
    *, flags: Flags
) -> Callable[[Callable[Concatenate[Session, P], object]], Callable[..., None]]: ...


def api_command(
    fn: Callable[Concatenate[Session, P], object] | None = None, *, flags: Flags = FLAGS
) -> Any:
    """A command that talks to the appliance: ``fn(session, …)`` renders what it got."""

    def decorate(f: Callable[Concatenate[Session, P], object]) -> Callable[..., None]:
        return _command(f, flags, follow=False)

    return decorate(fn) if fn is not None else decorate


def job_command(fn: Callable[Concatenate[Session, P], JobAnswer]) -> Callable[..., None]:
    """A command that starts a job: ``fn(session, …)`` builds the parameters and starts it,
    returning the answer; the command then follows the job (``--no-wait``: returns at once)."""
    return _command(fn, FLAGS, follow=True)


# --- what a command line may name ----------------------------------------------------------


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


AppName = Annotated[str, typer.Argument(help="The application.", metavar="APP")]
ImageId = Annotated[str, typer.Argument(help="The image's id.", metavar="IMAGE")]
Name = Annotated[str, typer.Argument(help="Its name.", metavar="NAME")]
Label = Annotated[str | None, typer.Option("--label", help="A label for the image.")]
