"""A DR host that is not the appliance reads and writes a test-failover copy over NBD with
TLS: the DR appliance made with ``--nbd-listen`` on a routable address, real daemons, the
CLI, and libnbd/qemu clients that pin the appliance's certificate."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.test_nbd_tls import routable_address
from tests.e2e.conftest import Drill, free_port, protect_and_replicate, running_drill
from tests.e2e.test_dr_presentation import MiB, digest, need


@pytest.fixture(scope="module")
def tls_drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    root = tmp_path_factory.mktemp("tls-drill")
    with running_drill(root, "--nbd-listen", f"{routable_address()}:{free_port()}") as built:
        yield built


def test_a_dr_host_reads_and_writes_the_copy_over_nbds(tls_drill: Drill, tmp_path: Path) -> None:
    d = tls_drill
    qemu_img = need("qemu-img", "qemu-utils")
    nbdcopy = need("nbdcopy", "libnbd-bin")
    volume = tmp_path / "disk.img"
    volume.write_bytes(os.urandom(8 * MiB))
    original = tmp_path / "original.img"
    shutil.copyfile(volume, original)
    protect_and_replicate(d, "db", "volume", volume)

    result = d.b("test-failover", "db", "--host", "host2")
    uri = result["nbd_uri"]
    assert result["nbd_fingerprint"] == d.dr.fingerprint
    assert result["job"]["result"]["nbd_fingerprint"] == d.dr.fingerprint
    host_port, wire = uri.removeprefix("nbds://").split("/")
    host, port = host_port.rsplit(":", 1)
    assert uri.startswith("nbds://") and host != "127.0.0.1"
    exported = d.b("image", "export", result["image"]["id"])
    assert exported["nbd_uri"] == uri and exported["nbd_fingerprint"] == d.dr.fingerprint

    # The DR host trusts exactly the appliance's certificate (the one its API pins).
    trust = tmp_path / "trust"
    trust.mkdir()
    shutil.copy(d.dr.directory / "cert.pem", trust / "ca-cert.pem")
    out = tmp_path / "read.raw"
    subprocess.run([nbdcopy, f"{uri}?tls-certificates={trust}", str(out)], check=True)
    assert digest(out) == digest(original)

    scribble = tmp_path / "scribble.raw"
    scribble.write_bytes(os.urandom(8 * MiB))
    subprocess.run([nbdcopy, str(scribble), f"{uri}?tls-certificates={trust}"], check=True)
    qemu_out = tmp_path / "qemu.raw"
    opts = (
        f"driver=nbd,server.type=inet,server.host={host},server.port={port},"
        f"export={wire},tls-creds=tls0"
    )
    creds = f"tls-creds-x509,id=tls0,dir={trust},endpoint=client"
    convert = [qemu_img, "convert", "--object", creds, "--image-opts", opts, "-O", "raw"]
    subprocess.run([*convert, str(qemu_out)], check=True)
    assert digest(qemu_out) == digest(scribble)

    # Without TLS, the same address and secret give nothing.
    plain = subprocess.run(
        [qemu_img, "info", "nbd://" + uri.removeprefix("nbds://")],
        capture_output=True,
        text=True,
    )
    assert plain.returncode != 0
