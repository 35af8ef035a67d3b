"""The operator at the keyboard: ``tandem`` commands run as child processes with ``--json``
against one appliance, which is how the end-to-end tests (and anything else that must see
the CLI exactly as an operator does) drive a site.

``Cli(url, token, fingerprint)("apps")`` runs ``tandem apps --json`` with ``TANDEM_URL``,
``TANDEM_TOKEN`` and ``TANDEM_FINGERPRINT`` set (and no other ``TANDEM_*`` variable of the
caller) and returns the one JSON document it printed; ``run`` returns the whole ``Result``
(exit status, document, stdout, stderr) and, with ``check=False``, accepts a failure.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

from .lab import child_env, tandem_argv

CLI_TIMEOUT = 120.0


@dataclass
class Result:
    code: int
    doc: Any
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The one-line error the CLI printed (stderr, stripped)."""
        return " ".join(self.stderr.split())


@dataclass
class Cli:
    """Runs `tandem` against one appliance (TANDEM_URL, TANDEM_TOKEN, TANDEM_FINGERPRINT)."""

    url: str
    token: str
    fingerprint: str
    log: list[str] = field(default_factory=list)
    """Each command run and its exit status, for a failing test to show."""

    def env(self, token: str | None = None) -> dict[str, str]:
        return child_env() | {
            "TANDEM_URL": self.url,
            "TANDEM_TOKEN": self.token if token is None else token,
            "TANDEM_FINGERPRINT": self.fingerprint,
        }

    def run(
        self, *args: str, token: str | None = None, check: bool = True, json_: bool = True
    ) -> Result:
        """Run ``tandem ARGS [--json]``; with ``check``, a non-zero exit raises
        AssertionError quoting the command's error."""
        argv = tandem_argv(*args, *(["--json"] if json_ else []))
        proc = subprocess.run(
            argv,
            env=self.env(token),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        self.log.append(f"$ tandem {' '.join(args)} -> {proc.returncode}")
        doc = None
        if json_ and proc.stdout.strip():
            doc = json.loads(proc.stdout)  # exactly one JSON document, or this fails
        result = Result(proc.returncode, doc, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`tandem {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return result

    def __call__(self, *args: str, **kwargs: Any) -> Any:
        """Run and return the JSON document (the command must succeed)."""
        return self.run(*args, **kwargs).doc
