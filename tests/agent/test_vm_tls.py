"""The certificate folder a hypervisor host's QEMU takes the NBD TLS credentials from
(``agent.vm.trust_appliance``): only a PEM certificate matching the pinned fingerprint is
written, each appliance's beside the others, and ``ca-cert.pem`` trusts all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tandem.agent.vm import trust_appliance
from tandem.errors import InvalidInput
from tandem.transport.agent_api import DefineRequest
from tandem.transport.tls import make_self_signed


def appliance(folder: Path, name: str) -> tuple[str, str]:
    folder.mkdir()
    fp = make_self_signed(folder / "cert.pem", folder / "key.pem", name, ["192.0.2.7"])
    return (folder / "cert.pem").read_text(), fp


def test_each_appliance_is_trusted_in_the_one_ca_file(tmp_path: Path) -> None:
    trust = tmp_path / "nbd-tls"
    pem1, fp1 = appliance(tmp_path / "a", "dr1")
    pem2, fp2 = appliance(tmp_path / "b", "dr2")
    assert trust_appliance(trust, pem1, fp1) == trust
    assert (trust / "ca-cert.pem").read_text() == pem1
    trust_appliance(trust, pem2, fp2)
    trust_appliance(trust, pem1, fp1)  # again: nothing doubles
    bundle = (trust / "ca-cert.pem").read_text()
    assert bundle.count("BEGIN CERTIFICATE") == 2 and pem1 in bundle and pem2 in bundle
    for name in ("ca-cert.pem", f"appliance-{fp1}.pem", f"appliance-{fp2}.pem"):
        assert (trust / name).stat().st_mode & 0o777 == 0o644  # QEMU's user reads them
    assert trust.stat().st_mode & 0o777 == 0o755
    assert not list(trust.glob(".tmp-*"))


def test_a_certificate_not_pinned_or_not_pem_is_refused(tmp_path: Path) -> None:
    trust = tmp_path / "nbd-tls"
    pem1, fp1 = appliance(tmp_path / "a", "dr1")
    pem2, _ = appliance(tmp_path / "b", "impostor")
    with pytest.raises(InvalidInput, match="does not match the fingerprint pinned"):
        trust_appliance(trust, pem2, fp1)
    with pytest.raises(InvalidInput, match="is not a PEM certificate"):
        trust_appliance(trust, "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----", fp1)
    key = (tmp_path / "a" / "key.pem").read_text()
    with pytest.raises(InvalidInput, match="is not a PEM certificate"):
        trust_appliance(trust, key, fp1)
    assert not (trust / "ca-cert.pem").exists()
    # A bundle with more in it is trusted as its first certificate alone.
    trust_appliance(trust, pem1 + pem2, fp1)
    assert (trust / "ca-cert.pem").read_text() == pem1


def test_an_nbds_export_comes_with_its_certificate(tmp_path: Path) -> None:
    pem, fp = appliance(tmp_path / "a", "dr1")
    base: dict[str, Any] = {
        "name": "vm-t",
        "xml": "<domain/>",
        "disks": [{"target": "vda", "offset": 0, "size": 1}],
    }
    DefineRequest(**base, nbd_uri="nbds://192.0.2.7:10809/x.s", nbd_ca=pem, nbd_fingerprint=fp)
    DefineRequest(**base, nbd_uri="nbd://127.0.0.1:10809/x.s")
    wrongs: list[dict[str, Any]] = [
        {"nbd_uri": "nbds://192.0.2.7:10809/x.s"},
        {"nbd_uri": "nbds://192.0.2.7:10809/x.s", "nbd_ca": pem},
        {"nbd_uri": "nbd://127.0.0.1:10809/x.s", "nbd_ca": pem, "nbd_fingerprint": fp},
        {"nbd_uri": "nbds://192.0.2.7:10809/x.s", "nbd_ca": pem, "nbd_fingerprint": "AB" * 32},
    ]
    for wrong in wrongs:
        with pytest.raises(ValidationError):
            DefineRequest(**base, **wrong)
