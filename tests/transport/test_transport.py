"""Transport: wire frames, error translation, pinned TLS, and naming of unreachable parties."""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tandem.errors import (
    CertificateMismatch,
    InvalidInput,
    NotFound,
    RemoteError,
    SourceUnreadable,
    Unreachable,
)
from tandem.transport import server
from tandem.transport.agent import AgentClient, error_from_event
from tandem.transport.chunks import RemotePool
from tandem.transport.client import ApiClient, error_from_response
from tandem.transport.server import init_daemon_dir
from tandem.transport.wire import (
    MAX_FRAME,
    FrameReader,
    decode_digests,
    decode_frames,
    encode_digests,
    encode_frames,
)
from tests.appliance.live import free_port


def test_frames_round_trip_and_refuse_garbage() -> None:
    frames = [(bytes([i]) * 32, b"x" * i) for i in range(5)]
    assert list(decode_frames(encode_frames(frames))) == frames
    with pytest.raises(InvalidInput, match="truncated"):
        list(decode_frames(b"\x00" * 10))
    with pytest.raises(InvalidInput, match="out of range"):
        list(decode_frames(encode_frames(frames)[:-1]))
    assert decode_digests(encode_digests([b"\x01" * 32])) == [b"\x01" * 32]
    for bad in ("zz", "ab"):
        with pytest.raises(InvalidInput):
            decode_digests([bad])


def test_frames_can_be_read_from_pieces_of_any_size() -> None:
    """A chunk batch read as it arrives: every cut of the stream yields the same frames."""
    rng = random.Random(3)
    frames = [(bytes([i]) * 32, rng.randbytes(rng.choice([0, 1, 37, 5000]))) for i in range(9)]
    body = encode_frames(frames)
    for _ in range(50):
        reader = FrameReader(len(body))
        got = []
        pos = 0
        while pos < len(body):
            step = rng.choice([1, 2, 35, 36, 37, 999, len(body)])
            got += [(d, b"".join(parts)) for d, parts in reader.feed(body[pos : pos + step])]
            pos += step
        reader.close()
        assert got == frames
    truncated = FrameReader(len(body))
    truncated.feed(body[:-1])
    with pytest.raises(InvalidInput, match="truncated"):
        truncated.close()
    with pytest.raises(InvalidInput, match="larger than"):
        FrameReader(len(body) - 1).feed(body)
    with pytest.raises(InvalidInput, match="out of range"):
        FrameReader(1 << 30).feed(b"\x00" * 32 + struct.pack("<I", MAX_FRAME + 1))


def test_server_errors_become_the_same_class() -> None:
    err = error_from_response(404, b'{"error": "NotFound", "message": "gone"}', "appliance", "a")
    assert isinstance(err, NotFound) and err.message == "gone"
    odd = error_from_response(502, b"<html>bad gateway</html>", "appliance", "a")
    assert isinstance(odd, RemoteError) and "HTTP 502" in odd.message
    unknown = error_from_response(500, b'{"error": "Nope", "message": "m"}', "host", "h")
    assert isinstance(unknown, RemoteError)


def test_agent_events_keep_their_class_but_never_blame_the_caller() -> None:
    err = error_from_event({"event": "error", "error": "SourceUnreadable", "message": "m"}, "h1")
    assert isinstance(err, SourceUnreadable) and err.message == "m"
    auth = error_from_event({"event": "error", "error": "Unauthorized", "message": "m"}, "h1")
    assert isinstance(auth, RemoteError) and auth.message == "host h1 answered with an error: m"


def test_unreachable_names_the_party(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    ApiClient(url, "t", "ab" * 32).close()  # pinning contacts no one: the call does
    with pytest.raises(Unreachable) as caught:
        AgentClient("web1", url, "t", "ab" * 32).info()
    assert caught.value.message.startswith(f"host web1 unreachable at {url}: ")
    with pytest.raises(Unreachable, match=f"appliance {url} unreachable at {url}"):
        ApiClient(url, "t", "ab" * 32).health()
    with pytest.raises(InvalidInput, match="no certificate fingerprint"):
        ApiClient(url, "t", None)


class TlsListener:
    """A TLS server with a daemon's certificate that accepts one connection, completes the
    handshake and keeps the first bytes the client sends (none if it closes instead)."""

    def __init__(self, daemon_dir: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(daemon_dir / "cert.pem", daemon_dir / "key.pem")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        got = b""
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                got = tls.recv(65536)  # the request's first bytes, or b"" at its close
        except (OSError, ssl.SSLError):
            pass  # the client dropped the connection without sending anything
        self.received.append(got)
        self.done.set()

    def close(self) -> None:
        self.sock.close()


def test_a_wrong_fingerprint_is_refused_before_the_token_is_sent(tmp_path: Path) -> None:
    from tandem.agent import app as agent_app
    from tandem.transport.server import load_daemon_dir
    from tests.appliance.live import LiveServer

    info = agent_app.init(tmp_path / "a", "a", f"127.0.0.1:{free_port()}")
    # The server holds the certificate, the client pins another: the handshake completes,
    # the pin check refuses it, and the server never sees a byte of the request.
    listener = TlsListener(tmp_path / "a")
    try:
        client = ApiClient(listener.url, "secret-token", "cd" * 32)
        with pytest.raises(CertificateMismatch, match="not the pinned"):
            client.get("/api/v1/info")
        client.close()
        assert listener.done.wait(30)
        assert listener.received == [b""]
    finally:
        listener.close()
    cfg = load_daemon_dir(tmp_path / "a", "agent")
    with LiveServer(agent_app.create_app(cfg, tmp_path / "a"), tmp_path / "a", cfg.port):
        with (
            ApiClient(info["url"], info["token"], "cd" * 32) as client,
            pytest.raises(CertificateMismatch, match="not the pinned"),
        ):
            client.get("/api/v1/info")
        with ApiClient(info["url"], info["token"], info["fingerprint"].upper()) as client:
            assert client.get("/api/v1/info")["name"] == "a"
            assert client.get("/api/v1/info")["name"] == "a"


def test_init_refuses_a_bad_listen_address(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="HOST:PORT"):
        init_daemon_dir(tmp_path / "d", kind="agent", name="a", listen="nowhere")


def test_remote_pool_knows_only_its_session_bases() -> None:
    pool = RemotePool(client=None, session="s", bases=[b"\x01" * 32])  # type: ignore[arg-type]
    assert pool.has_manifest(b"\x01" * 32) and not pool.has_manifest(b"\x02" * 32)


def test_one_daemon_per_directory(tmp_path: Path) -> None:
    from tandem.errors import TandemError
    from tandem.transport.server import lock_daemon_dir

    tmp_path.mkdir(exist_ok=True)
    held = lock_daemon_dir(tmp_path, "appliance")
    try:
        with pytest.raises(
            TandemError, match=r"Another appliance already runs from .* \(pid \d+\)"
        ):
            lock_daemon_dir(tmp_path, "appliance")
    finally:
        os.close(held)
    os.close(lock_daemon_dir(tmp_path, "appliance"))


def test_a_taken_address_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    from tandem.errors import TandemError
    from tandem.transport.server import bind, load_daemon_dir

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        init_daemon_dir(tmp_path / "d", kind="agent", name="a", listen=f"127.0.0.1:{port}")
        cfg = load_daemon_dir(tmp_path / "d", "agent")
        with pytest.raises(TandemError, match=f"Cannot listen on 127.0.0.1:{port}: "):
            bind(cfg)


@pytest.mark.parametrize("url", ["https://x:99999", "ftp://x", "https://", "nonsense"])
def test_bad_urls_are_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInput):
        ApiClient(url, "t", "ab" * 32)


def test_subs_frames_round_trip_and_big_asks_are_cut_under_the_limits() -> None:
    from tandem.transport.chunks import _split_wants
    from tandem.transport.wire import BLOCKS_PER_REQUEST, SUBS_PER_REQUEST, decode_subs, encode_subs

    subs = [bytes([i]) * 32 for i in range(3)]
    assert decode_subs(encode_subs(150_000, subs)) == (150_000, subs)
    for bad in (b"", b"\x00" * 7, b"\x00" * 9):
        with pytest.raises(InvalidInput):
            decode_subs(bad)
    wants = [(k.to_bytes(32, "little"), list(range(k % 70))) for k in range(2000)]
    requests = list(_split_wants(wants))
    for request in requests:
        assert sum(len(js) for _, js in request) <= BLOCKS_PER_REQUEST
        assert len(request) <= SUBS_PER_REQUEST
    # every index asked for exactly once, in order
    got: dict[int, list[int]] = {}
    for request in requests:
        for k, js in request:
            got.setdefault(k, []).extend(js)
    assert got == {k: js for k, (_, js) in enumerate(wants) if js}
    total = sum(len(js) for _, js in wants)
    assert len(requests) == -(-total // BLOCKS_PER_REQUEST)  # full requests but the last


def test_a_picked_port_is_never_one_the_kernel_hands_to_a_connection() -> None:
    """Daemons are given their port at init and bind it later: a port from the ephemeral
    range could meanwhile be the local end of any process's outgoing connection."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), ports
    assert len(ports) > 1  # random, not one port for every worker of a test run
    port = ports.pop()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # still free


def test_a_port_picked_by_one_process_is_not_picked_by_another_before_it_is_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``appliance init`` picks its NBD port in its own process while the caller picks the
    agent's: both free, neither bound yet. A pick is held machine-wide for a while, so
    another process whose first candidate is the same port takes its next one."""
    first, second = random.randrange(1000, 20000), random.randrange(1000, 20000)
    port, other = server.PICKED_PORTS_FROM + first, server.PICKED_PORTS_FROM + second
    held = Path(tempfile.gettempdir()) / "tandem-ports"
    for p in (port, other):
        (held / str(p)).unlink(missing_ok=True)
    monkeypatch.setattr("tandem.transport.server.secrets.randbelow", lambda n: first)
    assert server.free_port() == port
    script = (
        "import secrets; from tandem.transport import server; "
        f"picks = iter([{first}, {second}]); secrets.randbelow = lambda n: next(picks); "
        "print(server.free_port())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == other  # not the port this process picked and holds
