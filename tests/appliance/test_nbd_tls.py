"""NBD over TLS for hosts that are not the appliance: STARTTLS with the appliance's own
certificate, as qemu and libnbd speak it, required on any address but loopback.

The server listens on this machine's non-loopback address (the first of ``hostname -I``);
the certificate names that address, so clients verify it as they would on a DR host.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.appliance import nbd
from tandem.appliance.daemon import Appliance, init
from tandem.appliance.nbd import NbdServer, tls_context
from tandem.catalog import queries as q
from tandem.domain.images import ImageState
from tandem.errors import InvalidInput
from tandem.operations import present
from tandem.storage.overlay import Overlay
from tandem.transport import nbdproto
from tandem.transport.tls import fingerprint_of_pem, make_self_signed
from tests.appliance.conftest import Api
from tests.appliance.live import free_port
from tests.appliance.test_capabilities import SECRET
from tests.appliance.test_capabilities import present as present_image
from tests.appliance.test_nbd import (
    Image,
    RawClient,
    go_payload,
    image,
    overlay,
    run,
    wait_until,
)

__all__ = ["image", "overlay"]  # fixtures


def routable_address() -> str:
    """An address of this machine that is not loopback (the one a DR host would reach)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for addr in out:
        if ":" not in addr and not addr.startswith("127."):
            return addr
    pytest.fail("this machine has no non-loopback IPv4 address to listen on")


@pytest.fixture
def host() -> str:
    return routable_address()


@pytest.fixture
def cert_dir(tmp_path: Path, host: str) -> Path:
    """The appliance's certificate and key, and a client directory trusting it."""
    d = tmp_path / "tls"
    d.mkdir()
    make_self_signed(d / "cert.pem", d / "key.pem", "nbd-test", [host])
    client = d / "client"
    client.mkdir()
    (client / "ca-cert.pem").write_bytes((d / "cert.pem").read_bytes())
    return d


@pytest.fixture
def tls_server(host: str, cert_dir: Path) -> Iterator[NbdServer]:
    with NbdServer(host, 0, tls=tls_context(cert_dir / "cert.pem", cert_dir / "key.pem")) as srv:
        yield srv


def hung_up(sock: socket.socket) -> bool:
    """Whether the server closed the connection (a reset, if it left our bytes unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def with_certs(uri: str, directory: Path) -> str:
    return f"{uri}?tls-certificates={directory}"


def test_nbdcopy_and_qemu_img_read_the_image_over_tls(
    tls_server: NbdServer, cert_dir: Path, image: Image, overlay: Overlay, tmp_path: Path
) -> None:
    uri = tls_server.add_export("copy", overlay)
    assert uri.startswith(f"nbds://{tls_server.host}:{tls_server.port}/copy.")
    client = cert_dir / "client"
    out = tmp_path / "nbdcopy.raw"
    run("nbdcopy", with_certs(uri, client), str(out))
    assert out.read_bytes() == image.data
    info = json.loads(run("nbdinfo", "--json", with_certs(uri, client)).stdout)
    assert info["TLS"] is True

    export = uri.rsplit("/", 1)[1]
    qemu_out = tmp_path / "qemu.raw"
    run(
        "qemu-img",
        "convert",
        "--object",
        f"tls-creds-x509,id=tls0,dir={client},endpoint=client",
        "--image-opts",
        f"driver=nbd,server.type=inet,server.host={tls_server.host},"
        f"server.port={tls_server.port},export={export},tls-creds=tls0",
        "-O",
        "raw",
        str(qemu_out),
    )
    assert qemu_out.read_bytes() == image.data


def test_a_plain_client_is_refused_with_tls_required(
    tls_server: NbdServer, overlay: Overlay
) -> None:
    uri = tls_server.add_export("copy", overlay)
    plain = "nbd://" + uri.split("://", 1)[1]
    proc = run("nbdinfo", "--size", plain, check=False)
    assert proc.returncode != 0 and "TLS" in proc.stderr

    raw = RawClient(tls_server.port, tls_server.host)
    try:
        wire = uri.rsplit("/", 1)[1]
        for option, data in (
            (nbdproto.OPT_GO, go_payload(wire)),
            (nbdproto.OPT_INFO, go_payload(wire)),
            (nbdproto.OPT_LIST, b""),
            (nbdproto.OPT_STRUCTURED_REPLY, b""),
        ):
            assert raw.option(option, data) == [
                (nbdproto.REP_ERR_TLS_REQD, b"this server requires STARTTLS first")
            ]
        # NBD_OPT_EXPORT_NAME has no error reply: the server hangs up, serving nothing.
        raw.sock.sendall(
            struct.pack(">QII", nbdproto.IHAVEOPT, nbdproto.OPT_EXPORT_NAME, len(wire))
        )
        raw.sock.sendall(wire.encode())
        assert hung_up(raw.sock)
    finally:
        raw.close()
    assert tls_server.connection_stats().established == 0


def test_a_client_that_does_not_trust_the_certificate_fails(
    tls_server: NbdServer, host: str, overlay: Overlay, tmp_path: Path, cert_dir: Path
) -> None:
    uri = tls_server.add_export("copy", overlay)
    other = tmp_path / "other"
    other.mkdir()
    make_self_signed(other / "ca-cert.pem", other / "key.pem", "impostor", [host])
    proc = run("nbdinfo", "--size", with_certs(uri, other), check=False)
    assert proc.returncode != 0
    assert run("nbdinfo", "--size", with_certs(uri, cert_dir / "client")).stdout.strip() == str(
        overlay.size
    )


def test_raw_starttls_then_go_inside_tls(
    tls_server: NbdServer, overlay: Overlay, cert_dir: Path
) -> None:
    """The negotiation goes on inside TLS after STARTTLS; STARTTLS twice is invalid."""
    wire = tls_server.add_export("copy", overlay).rsplit("/", 1)[1]
    raw = RawClient(tls_server.port, tls_server.host)
    try:
        assert raw.option(nbdproto.OPT_STARTTLS) == [(nbdproto.REP_ACK, b"")]
        ctx = ssl.create_default_context(cafile=str(cert_dir / "cert.pem"))
        raw.sock = ctx.wrap_socket(raw.sock, server_hostname=tls_server.host)
        assert raw.option(nbdproto.OPT_STARTTLS)[0][0] == nbdproto.REP_ERR_INVALID
        replies = raw.option(nbdproto.OPT_GO, go_payload(wire))
        assert replies[-1][0] == nbdproto.REP_ACK
        assert raw.request(nbdproto.CMD_READ, 0, 4096) == 0
    finally:
        raw.close()


def test_handshake_limits_hold_before_and_during_starttls(
    host: str, cert_dir: Path, overlay: Overlay
) -> None:
    ctx = tls_context(cert_dir / "cert.pem", cert_dir / "key.pem")
    with NbdServer(host, 0, tls=ctx, handshake_timeout=0.5) as srv:
        # Options before STARTTLS count against the per-handshake limit.
        raw = RawClient(srv.port, host)
        try:
            for _ in range(nbd.MAX_OPTIONS):
                assert raw.option(nbdproto.OPT_LIST)[0][0] == nbdproto.REP_ERR_TLS_REQD
            raw.sock.sendall(struct.pack(">QII", nbdproto.IHAVEOPT, nbdproto.OPT_LIST, 0))
            assert hung_up(raw.sock)
        finally:
            raw.close()
        # A client that asks for STARTTLS and never starts TLS is dropped in time.
        stalled = RawClient(srv.port, host)
        try:
            stalled.sock.settimeout(30)
            assert stalled.option(nbdproto.OPT_STARTTLS) == [(nbdproto.REP_ACK, b"")]
            assert hung_up(stalled.sock)
        finally:
            stalled.close()
        wait_until(lambda: srv.connection_stats().pending == 0, "stalled handshakes dropped")


def test_no_plain_nbd_off_loopback(host: str, overlay: Overlay) -> None:
    srv = NbdServer(host, 0)
    with pytest.raises(InvalidInput, match="must use TLS"):
        srv.start()
    assert not srv.running
    with socket.create_server((host, 0)) as probe:  # the address itself is usable
        assert probe.getsockname()[0] == host


# --- the appliance: where NBD listens, and with which certificate -----------------------


@pytest.fixture
def appliance_on(tmp_path: Path) -> Iterator[Callable[..., Appliance]]:
    """Make (init) and start appliances; stopped at the end."""
    made: list[Appliance] = []

    def make(name: str, **nbd_options: Any) -> Appliance:
        directory = tmp_path / name
        init(directory, name, f"127.0.0.1:{free_port()}", None, **nbd_options)
        appliance = Appliance(directory, workers=1)
        made.append(appliance)
        appliance.nbd.start()
        return appliance

    yield make
    for appliance in made:
        appliance.stop()


def test_an_appliance_serves_nbd_over_tls_where_the_operator_says(
    appliance_on: Callable[..., Appliance], host: str, overlay: Overlay, tmp_path: Path
) -> None:
    port = free_port()
    appliance = appliance_on("site-a", nbd_listen=f"{host}:{port}")
    assert (appliance.nbd.host, appliance.nbd.port) == (host, port)
    uri = appliance.nbd.add_export("copy", overlay)
    assert uri.startswith(f"nbds://{host}:{port}/copy.")
    # The certificate is the API's (its fingerprint is the one clients pin) and names the
    # NBD address, so libnbd verifies it as is.
    pem = (appliance.directory / "cert.pem").read_text()
    assert fingerprint_of_pem(pem) == appliance.config.fingerprint
    assert present.export_fingerprint(appliance.site, uri) == appliance.config.fingerprint
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "ca-cert.pem").write_text(pem)
    size = run("nbdinfo", "--size", with_certs(uri, trust)).stdout.strip()
    assert size == str(overlay.size)
    assert run("nbdinfo", "--size", "nbd://" + uri.split("://")[1], check=False).returncode


def test_loopback_nbd_stays_plain_unless_asked(
    appliance_on: Callable[..., Appliance], overlay: Overlay, tmp_path: Path
) -> None:
    plain = appliance_on("plain")
    assert plain.nbd.tls is None
    uri = plain.nbd.add_export("copy", overlay)
    assert uri.startswith("nbd://127.0.0.1:")
    assert present.export_fingerprint(plain.site, uri) is None
    assert run("nbdinfo", "--size", uri).stdout.strip() == str(overlay.size)

    tls = appliance_on("tls", nbd_listen=f"127.0.0.1:{free_port()}", nbd_tls=True)
    assert tls.nbd.add_export("copy", overlay).startswith("nbds://127.0.0.1:")


def test_the_export_request_gives_the_fingerprint_to_pin(api: Api, tmp_path: Path) -> None:
    shown = present_image(api, tmp_path)
    uri = f"nbds://192.0.2.2:10809/{shown.image}.{SECRET}"
    with api.appliance.catalog.begin() as session:
        q.set_image_state(
            session,
            image_id=shown.image,
            state=ImageState.MOUNTED,
            mounted_host="h1",
            nbd_export=uri,
        )
    answer = api.client.post(
        f"/api/v1/images/{shown.image}/export", headers=api.headers("operator")
    ).json()
    assert answer == {
        "image": shown.image,
        "nbd_uri": uri,
        "nbd_fingerprint": api.appliance.config.fingerprint,
    }


def test_bad_nbd_listen_is_refused_and_nothing_is_made(tmp_path: Path) -> None:
    for bad, message in (
        ("nowhere", "--nbd-listen takes HOST:PORT"),
        ("0.0.0.0:10809", "Give --nbd-listen the appliance's address"),
    ):
        directory = tmp_path / "bad"
        listen = "0.0.0.0:8443" if bad.startswith("0.0.0.0") else "127.0.0.1:8443"
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "tandem"),
                "appliance",
                "init",
                str(directory),
                "--name",
                "a",
                "--listen",
                listen,
                "--nbd-listen",
                bad,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert message in proc.stderr + proc.stdout
        assert not (directory / "config.json").exists()
