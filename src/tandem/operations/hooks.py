"""Hooks: the one place the appliance asks a host's agent to run an app's hook script.

Invariants
- Every operation that stops or starts an app (restore, failover, replica-style failback at
  either site) calls ``run_hook``; no other appliance code sends ``/api/v1/run`` to an
  agent (only ``tandem demo``, which drives its own lab hosts, calls it directly).
- What is sent is the script's *name* (as stored for the app, checked when it was
  registered) and the environment of ``hook_env``, never a command line. The agent runs
  ``scripts/NAME`` from its own folder and refuses anything else (``tandem.agent.hooks``).
- The environment: ``TANDEM_APP``, ``TANDEM_SITE`` (``production`` for an app this
  appliance owns, ``dr`` for a mirror of the peer's), ``TANDEM_OPERATION`` (the job type),
  ``TANDEM_IMAGE`` (the image acted on, when there is one), ``TANDEM_APP_PATH`` (the path of
  the copy the hook acts on: at the DR site the failed-over copy's mount point, not
  production's path; left out when the copy has none, as a volume served over NBD) and
  ``TANDEM_NBD_URI`` (a volume's export, when there is one).
- A hook that exits non-zero raises ``HookFailed`` with the last line of its output; its
  output is logged to the job. The caller says what that means for its operation.
"""

from __future__ import annotations

from tandem.catalog import queries as q
from tandem.catalog.models import App
from tandem.domain.hooks import Hook, HookSite, check_hook_env
from tandem.errors import HookFailed
from tandem.jobs.runner import JobContext
from tandem.transport.agent import AgentClient

HOOK_TIMEOUT = 600.0


def script_for(app: App, hook: Hook) -> str | None:
    """The name of the app's ``hook`` script, or ``None`` when it has none."""
    return q.app_hooks(app).get(hook.value) or None


def site_of(app: App) -> HookSite:
    """Whose copy the app's hooks act on: this appliance's own app, or a mirror's DR copy."""
    return HookSite.PRODUCTION if app.origin is None else HookSite.DR


def hook_env(
    app: App,
    *,
    operation: str,
    image: str | None = None,
    path: str | None = None,
    nbd_uri: str | None = None,
) -> dict[str, str]:
    """The ``TANDEM_*`` environment a hook of ``app`` runs with."""
    env = {
        "TANDEM_APP": app.name,
        "TANDEM_SITE": site_of(app).value,
        "TANDEM_OPERATION": operation,
    }
    for key, value in (
        ("TANDEM_IMAGE", image),
        ("TANDEM_APP_PATH", path),
        ("TANDEM_NBD_URI", nbd_uri),
    ):
        if value:
            env[key] = value
    return check_hook_env(env)


def run_hook(
    agent: AgentClient,
    app: App,
    hook: Hook,
    *,
    operation: str,
    image: str | None = None,
    path: str | None = None,
    nbd_uri: str | None = None,
    ctx: JobContext | None = None,
    timeout: float = HOOK_TIMEOUT,
) -> bool:
    """Run the app's ``hook`` script on ``agent``'s host; ``False`` if the app has none.

    Raises ``HookFailed`` when the script exits non-zero, and the agent's ``HookRefused``
    when the host will not run it (no such script, wrong owner or mode…).
    """
    script = script_for(app, hook)
    if script is None:
        return False
    env = hook_env(app, operation=operation, image=image, path=path, nbd_uri=nbd_uri)
    if ctx is not None:
        ctx.set_message(f"running the {hook} hook {script!r} of {app.name} on host {agent.name}")
    result = agent.run_hook(script, env, timeout=timeout)
    if ctx is not None:
        for stream in ("stdout", "stderr"):
            text = str(result.get(stream) or "").strip()
            if text:
                ctx.log(f"{hook} hook {stream}: {text}")
    code = int(result["returncode"])
    if code != 0:
        tail = str(result.get("stderr") or result.get("stdout") or "").strip().splitlines()
        raise HookFailed(
            hook=hook.value,
            script=script,
            app=app.name,
            status=code,
            host=agent.name,
            why=f" ({tail[-1][:300]})" if tail else "",
        )
    if ctx is not None:
        ctx.log(f"{hook} hook {script!r} succeeded on host {agent.name}")
    return True
