"""Hooks on the host: the agent runs scripts from its own ``scripts/`` folder, by name.

Invariants
- The appliance names a script and passes an environment; it never sends a command line.
  ``RunRequest`` accepts a script name (``tandem.domain.hooks``: no ``/``, no ``..``) and
  only the ``TANDEM_*`` variables of ``ENV_KEYS``; anything else is a 422.
- A script runs only if, checked on open file descriptors (no path is followed twice):
  the folder ``DIR/scripts`` is a real folder (not a symbolic link) owned by root and not
  writable by group or others, and the script is a regular file in it (opened with
  ``O_NOFOLLOW``: a symbolic link is refused, wherever it points), owned by root, executable
  by its owner and not writable by group or others. "Root" is uid 0, or the agent's own uid
  when the agent does not run as root (a test or a personal install), since that user
  could run anything anyway. Otherwise the agent answers ``HookRefused`` (422) naming why.
- The agent's folder DIR itself must pass the same owner and mode check (``init`` makes
  it 0700): whoever could write it could rename another folder to ``scripts``.
- Between that check and the exec, only the folder's owner can replace the file, and the
  owner is who the check trusts. This is also why a hard link in the folder (to
  ``/bin/sh``, say) is harmless: only root can make one there.
- The script is executed directly (no shell), with no arguments, from ``/``, with the
  agent's environment minus its own ``TANDEM_*`` settings plus the request's variables, its
  stdin closed, in a session of its own, with a timeout. Output goes to temporary files,
  not pipes: a start script that leaves a daemon running with them inherited would
  otherwise keep the agent waiting until the timeout. The agent reports the exit status and
  the tail of the output; the appliance decides what a failure means.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tandem.domain.hooks import (
    is_hook_name,
)
from tandem.errors import HookRefused, HookTimedOut
from tandem.transport.agent_api import RunRequest

SCRIPTS = "scripts"
"""The folder in the agent's DIR that holds the hook scripts."""
FOLDER_MODE = 0o755
OUTPUT_TAIL = 4000
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def init_folder(directory: Path) -> Path:
    """Create ``directory/scripts`` (0755): the only place hook scripts run from."""
    folder = directory / SCRIPTS
    folder.mkdir(mode=FOLDER_MODE, exist_ok=True)
    os.chmod(folder, FOLDER_MODE)  # whatever the umask
    return folder


def trusted_uids() -> frozenset[int]:
    """Who may own the folder and the scripts: root, and the agent's own user."""
    return frozenset({0, os.geteuid()})


def _refused(script: str, folder: Path, reason: str) -> HookRefused:
    return HookRefused(script=script, folder=str(folder), reason=reason)


def _owner_problem(st: os.stat_result, what: str) -> str | None:
    if st.st_uid not in trusted_uids():
        return f"{what} is owned by uid {st.st_uid}, not by root"
    if st.st_mode & WRITABLE_BY_OTHERS:
        return (
            f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "chmod go-w it"
        )
    return None


def check_script(folder: Path, script: str) -> Path:
    """The path of ``script`` in ``folder`` if it may run (see the module's invariants)."""
    if not is_hook_name(script):
        raise _refused(script, folder, "it is not a plain file name")
    try:
        parent_fd = os.open(folder.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        reason = f"the agent's folder cannot be opened ({exc.strerror})"
        raise _refused(script, folder, reason) from None
    try:
        # Whoever may write the agent's folder could swap the scripts folder for another.
        problem = _owner_problem(os.fstat(parent_fd), "the agent's folder")
        if problem:
            raise _refused(script, folder, problem)
        dir_fd = os.open(
            folder.name,
            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=parent_fd,
        )
    except FileNotFoundError:
        raise _refused(script, folder, "the scripts folder does not exist") from None
    except OSError as exc:
        raise _refused(
            script, folder, f"the scripts folder is not a plain folder ({exc.strerror})"
        ) from None
    finally:
        os.close(parent_fd)
    try:
        problem = _owner_problem(os.fstat(dir_fd), "the scripts folder")
        if problem:
            raise _refused(script, folder, problem)
        try:
            fd = os.open(
                script,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except FileNotFoundError:
            raise _refused(script, folder, "there is no such file in the folder") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refused(
                    script, folder, "it is a symbolic link (hooks are regular files)"
                ) from None
            raise _refused(script, folder, f"it cannot be opened ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(st.st_mode):
        raise _refused(script, folder, "it is not a regular file")
    problem = _owner_problem(st, "it")
    if problem:
        raise _refused(script, folder, problem)
    if not st.st_mode & stat.S_IXUSR:
        raise _refused(script, folder, "it is not executable; chmod 0755 it")
    return folder / script


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(extra)
    return env


def _tail(fh: Any) -> str:
    fh.seek(0, os.SEEK_END)
    fh.seek(max(0, fh.tell() - 4 * OUTPUT_TAIL))
    return str(fh.read().decode(errors="replace"))[-OUTPUT_TAIL:]


def run_hook(req: RunRequest, folder: Path) -> dict[str, Any]:
    """Run the checked script; returns ``{returncode, stdout, stderr}`` (output tails)."""
    path = check_script(folder, req.script)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(
                [str(path)],
                executable=str(path),
                env=_environment(req.env),
                cwd="/",
                stdout=out,
                stderr=err,
                timeout=req.timeout,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise HookTimedOut(script=req.script, seconds=req.timeout) from exc
        except OSError as exc:
            # e.g. ENOEXEC: no "#!" line, or an interpreter that does not exist
            raise _refused(req.script, folder, f"it could not be executed ({exc})") from exc
        return {"returncode": proc.returncode, "stdout": _tail(out), "stderr": _tail(err)}
