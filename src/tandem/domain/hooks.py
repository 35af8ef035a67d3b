"""Hooks: the scripts a host runs for an app (stop before a restore, start after a failover…).

Invariants
- A hook is referenced by the *name* of a script in the host agent's ``scripts/`` folder,
  never by a command line: a name is 1-128 characters of ``[A-Za-z0-9._-]`` starting with
  a letter or digit (so no ``/``, no ``..`` as a whole name, nothing a shell would read).
  What a name runs is decided on the host, by whoever may write that folder (root).
- The appliance passes context to a hook only through the environment, with the keys in
  ``ENV_KEYS`` and nothing else: ``TANDEM_APP``, ``TANDEM_SITE`` (``production``/``dr``),
  ``TANDEM_OPERATION``, ``TANDEM_IMAGE``, ``TANDEM_APP_PATH`` (the copy the hook acts on)
  and ``TANDEM_NBD_URI`` (a volume's export, when there is one). Both the appliance's API and
  the agent check names and environments with the functions here.
"""

from __future__ import annotations

import re
from enum import StrEnum

from tandem.errors import InvalidInput

HOOK_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_HOOK_NAME = 128
MAX_ENV_VALUE = 4096
_HOOK_NAME_RE = re.compile(HOOK_NAME)


class Hook(StrEnum):
    """When a hook runs: the app's ``--start``/``--stop``/``--freeze``/``--thaw`` script."""

    START = "start"
    STOP = "stop"
    FREEZE = "freeze"
    THAW = "thaw"


class HookSite(StrEnum):
    """Which copy of the app a hook acts on: production's, or the DR site's."""

    PRODUCTION = "production"
    DR = "dr"


ENV_KEYS = frozenset(
    {
        "TANDEM_APP",
        "TANDEM_SITE",
        "TANDEM_OPERATION",
        "TANDEM_IMAGE",
        "TANDEM_APP_PATH",
        "TANDEM_NBD_URI",
    }
)


def is_hook_name(name: str) -> bool:
    return _HOOK_NAME_RE.fullmatch(name) is not None


def hook_name_problem(name: str, what: str = "hook script") -> str:
    """What is wrong with ``name`` as a hook script name, and how to write one."""
    return (
        f"{what} {name[:200]!r} is not a script name: give the name of a file in the host "
        "agent's scripts/ folder (1-128 letters, digits, '.', '_' or '-', starting with a "
        "letter or digit; no '/'), such as pg-stop"
    )


def check_hook_name(name: str, what: str = "hook script") -> str:
    """Return ``name`` if it can name a script in the agent's scripts folder; else raise."""
    if is_hook_name(name):
        return name
    raise InvalidInput(detail=hook_name_problem(name, what))


def check_hook_env(env: dict[str, str]) -> dict[str, str]:
    """Return ``env`` if every key is one of ``ENV_KEYS`` and every value is usable; else raise."""
    for key, value in env.items():
        if key not in ENV_KEYS:
            raise InvalidInput(
                detail=f"hook environment variable {key[:100]!r} is not one tandem sets; "
                f"use only {', '.join(sorted(ENV_KEYS))}"
            )
        if "\x00" in value or len(value) > MAX_ENV_VALUE:
            raise InvalidInput(
                detail=f"hook environment variable {key} must be at most {MAX_ENV_VALUE} "
                "characters without NUL"
            )
    site = env.get("TANDEM_SITE")
    if site is not None and site not in {s.value for s in HookSite}:
        raise InvalidInput(
            detail=f"TANDEM_SITE {site[:100]!r} is neither 'production' nor 'dr'; send one of them"
        )
    return env
