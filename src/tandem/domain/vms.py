"""Virtual machines: names and rules that need no hypervisor (pure)."""

from __future__ import annotations

import re

from tandem.errors import InvalidInput

DOMAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
"""A libvirt domain name tandem accepts: safe in XML, paths and messages."""
FILE_POOLS = ("dir", "fs", "netfs")
"""Storage pool types whose volumes are files: a failback ``--target new`` makes a new VM's
disks as qcow2 files there, which a VM restore writes in place."""


def check_domain_name(name: str, what: str = "--domain") -> str:
    if not re.fullmatch(DOMAIN_NAME[1:-1], name):
        raise InvalidInput(
            detail=f"{what} {name!r} is not a libvirt domain name tandem accepts: letters, "
            "digits and . _ + - (at most 64, starting with a letter or digit)"
        )
    return name
