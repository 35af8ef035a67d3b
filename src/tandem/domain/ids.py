"""Identifiers and names.

Invariants
- An id is a prefix naming what it identifies, an underscore and 12 lowercase base32
  characters (60 random bits), e.g. ``img_k3v7q2m9a4bx``: short enough to type, unique
  enough for one catalog (a collision is also caught by the primary key).
- A name (app, host, template, peer, token) is 1-64 characters of ``[A-Za-z0-9._-]``
  starting with a letter or digit, so it is safe in URLs, paths and shell commands.
- The patterns below are the one statement of these shapes: the API declares its path
  parameters with them (a ``../apps/x`` never reaches a route) and the CLI checks ids and
  names with them before it sends anything.
"""

from __future__ import annotations

import base64
import re
import secrets

from tandem.errors import NameInvalid

ID_LENGTH = 12
IMAGE_PREFIX = "img"
JOB_PREFIX = "job"
APP_PREFIX = "app"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
IMAGE_ID_PATTERN = rf"^{IMAGE_PREFIX}_[a-z2-7]{{{ID_LENGTH}}}$"
JOB_ID_PATTERN = rf"^{JOB_PREFIX}_[a-z2-7]{{{ID_LENGTH}}}$"

_NAME_RE = re.compile(NAME_PATTERN)
_ID_RE = re.compile(rf"[a-z]+_[a-z2-7]{{{ID_LENGTH}}}")


def new_id(prefix: str) -> str:
    """A fresh random id such as ``job_4fq2w7xkz3ma``."""
    random = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
    return f"{prefix}_{random[:ID_LENGTH]}"


def new_image_id() -> str:
    return new_id(IMAGE_PREFIX)


def new_job_id() -> str:
    return new_id(JOB_PREFIX)


def new_app_id() -> str:
    return new_id(APP_PREFIX)


def is_id(value: str, prefix: str | None = None) -> bool:
    """Whether ``value`` looks like an id (with the given prefix, if any)."""
    if not _ID_RE.fullmatch(value):
        return False
    return prefix is None or value.startswith(prefix + "_")


def is_image_id(value: str) -> bool:
    """Whether ``value`` has the shape of an image id (``img_`` and 12 base32 characters)."""
    return re.fullmatch(IMAGE_ID_PATTERN, value) is not None


def is_job_id(value: str) -> bool:
    """Whether ``value`` has the shape of a job id (``job_`` and 12 base32 characters)."""
    return re.fullmatch(JOB_ID_PATTERN, value) is not None


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid name; raise ``InvalidInput`` saying why otherwise."""
    if _NAME_RE.fullmatch(name):
        return name
    raise NameInvalid(
        what=what,
        name=name,
        rule="1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    )
