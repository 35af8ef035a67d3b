"""The NBD server, driven by real clients from Debian: qemu-img (qemu-utils), nbdinfo and
nbdcopy (libnbd-bin), nbdsh (python3-libnbd); plus a raw-socket client for what well-behaved
clients never send.

These tools are required, not optional: a missing one fails the test naming its package.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tandem.appliance import nbd
from tandem.appliance.nbd import ImageBackend, NbdServer
from tandem.errors import AlreadyExists, InvalidInput, NotFound
from tandem.storage.digest import SUB_BLOCK
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest
from tandem.storage.overlay import Overlay, capture_overlay
from tandem.storage.pool import ChunkPool
from tandem.storage.volume import capture_volume, restore_volume
from tandem.transport import nbdproto
from tests.poolfiles import chunk_file

MiB = 1024 * 1024
PACKAGES = {
    "qemu-img": "qemu-utils",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "python3-libnbd",
}


def tool(name: str) -> str:
    """The path of a client tool; a missing one fails the test with the package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install {PACKAGES[name]}")
    return path


def tool_env() -> dict[str, str]:
    """nbdsh runs `python3 -m nbd`: Debian's python3 (with python3-libnbd), not this venv's."""
    return {**os.environ, "PATH": "/usr/bin:/bin:" + os.environ.get("PATH", "")}


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a client tool and fail the test, with its stderr, when it fails (unless check is
    off)."""
    tool(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=tool_env())
    if args[0] == "nbdsh" and "No module named nbd" in proc.stderr:
        pytest.fail("nbdsh needs the libnbd Python module: apt-get install python3-libnbd")
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@dataclass
class Image:
    id: bytes
    manifest: VolumeManifest
    data: bytes
    path: Path


@pytest.fixture
def image(pool: ChunkPool, tmp_path: Path) -> Image:
    """A 14 MiB + 4 KiB image: random data, an all-zero chunk and a short tail."""
    rng = random.Random(7)
    data = bytearray(rng.randbytes(14 * MiB + 4096))
    data[VOLUME_CHUNK : 2 * VOLUME_CHUNK] = bytes(VOLUME_CHUNK)
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    mid, manifest, _ = capture_volume(pool, path)
    return Image(mid, manifest, bytes(data), path)


@pytest.fixture
def server() -> Iterator[NbdServer]:
    with NbdServer("127.0.0.1", 0) as srv:
        yield srv


@pytest.fixture
def overlay(pool: ChunkPool, image: Image, tmp_path: Path) -> Iterator[Overlay]:
    ov = Overlay.create(tmp_path / "overlay", pool, image.manifest, image.id)
    yield ov
    ov.close()


def test_qemu_img_reads_an_image_export_byte_identical(
    server: NbdServer, pool: ChunkPool, image: Image, tmp_path: Path
) -> None:
    uri = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    assert out.read_bytes() == image.data
    proc = run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(image.path))
    assert "identical" in proc.stdout


def test_nbdinfo_reports_size_and_flags(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay
) -> None:
    ro = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    rw = server.add_export("copy", overlay)
    assert run("nbdinfo", "--size", ro).stdout.strip() == str(len(image.data))
    info = json.loads(run("nbdinfo", "--json", rw).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == len(image.data)
    assert export["is_read_only"] is False
    assert export["can_flush"] and export["can_trim"] and export["can_zero"]
    assert export["can_multi_conn"] and export["can_fua"]
    assert export["block_size_preferred"] == SUB_BLOCK
    info = json.loads(run("nbdinfo", "--json", ro).stdout)
    assert info["exports"][0]["is_read_only"] is True


def test_nbdcopy_writes_into_an_overlay_and_reads_back(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay, tmp_path: Path
) -> None:
    local = tmp_path / "local.raw"
    data = bytearray(random.Random(8).randbytes(len(image.data)))
    data[6 * MiB : 9 * MiB] = bytes(3 * MiB)  # nbdcopy sends zeroes for these
    local.write_bytes(data)
    uri = server.add_export("copy", overlay)
    run("nbdcopy", str(local), uri)
    out = tmp_path / "out.raw"
    run("nbdcopy", uri, str(out))
    assert out.read_bytes() == data
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(local))
    # the base is untouched: the replica still serves its own bytes
    ro = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    run("nbdcopy", ro, str(out))
    assert out.read_bytes() == image.data
    # and what was written can be captured and restored
    server.remove_export("copy")
    _, manifest, stats = capture_overlay(pool, overlay)
    assert stats.bytes_read == overlay.dirty_bytes()
    restored = tmp_path / "restored.raw"
    restore_volume(pool, manifest, restored)
    assert restored.read_bytes() == data


def test_writes_to_a_read_only_export_fail(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay, tmp_path: Path
) -> None:
    ro = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    ro_overlay = server.add_export("frozen", overlay, read_only=True)
    local = tmp_path / "local.raw"
    local.write_bytes(os.urandom(len(image.data)))
    assert run("nbdcopy", str(local), ro, check=False).returncode != 0
    # with libnbd's client-side checks off, the writes reach the server: EPERM
    script = (
        "h.set_strict_mode(0)\n"
        "for op in (lambda: h.pwrite(b'x' * 512, 0), lambda: h.zero(4096, 0),\n"
        "           lambda: h.trim(4096, 0)):\n"
        "    try:\n"
        "        op()\n"
        "        print('written')\n"
        "    except nbd.Error as e:\n"
        "        print(e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno])\n"
    )
    for uri in (ro, ro_overlay):
        out = run("nbdsh", "-u", uri, "-c", "import errno", "-c", script).stdout.split()
        assert out == ["EPERM", "EPERM", "EPERM"]
    # an image exported writable by mistake still refuses: the backend says EPERM
    wrong = server.add_export("mistake", ImageBackend(pool, image.manifest))
    out = run("nbdsh", "-u", wrong, "-c", "import errno", "-c", script).stdout.split()
    assert out == ["EPERM", "EPERM", "EPERM"]
    assert overlay.dirty_ranges() == []
    # a writable copy frozen by a failback refuses writes the same way, until thawed
    live = server.add_export("live", overlay)
    overlay.freeze()
    try:
        out = run("nbdsh", "-u", live, "-c", "import errno", "-c", script).stdout.split()
        assert out == ["EPERM", "EPERM", "EPERM"]
        assert overlay.dirty_ranges() == []
    finally:
        overlay.thaw()
    out = run("nbdsh", "-u", live, "-c", "import errno", "-c", script).stdout.split()
    assert out == ["written", "written", "written"]


def test_several_clients_at_once(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay, tmp_path: Path
) -> None:
    ro = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    rw = server.add_export("copy", overlay)
    procs = []
    for i in range(3):
        procs.append(
            subprocess.Popen(
                [tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", ro, str(tmp_path / f"q{i}")]
            )
        )
        procs.append(
            subprocess.Popen([tool("nbdcopy"), "--connections=2", rw, str(tmp_path / f"c{i}")])
        )
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    for i in range(3):
        assert (tmp_path / f"q{i}").read_bytes() == image.data
        assert (tmp_path / f"c{i}").read_bytes() == image.data


def test_zero_trim_flush_and_fua_with_nbdsh(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay, tmp_path: Path
) -> None:
    uri = server.add_export("copy", overlay)
    script = f"""
h.pwrite(b'\\xab' * 3 * {SUB_BLOCK}, {SUB_BLOCK})
h.zero({SUB_BLOCK} + 50, 100)  # (count, offset): partial blocks, read-modify-write
h.trim({SUB_BLOCK}, {2 * SUB_BLOCK})  # a whole block
h.pwrite(b'fua', {10 * MiB}, nbd.CMD_FLAG_FUA)
h.zero({4 * MiB}, {4 * MiB})  # the whole zero chunk of the base: clean again
h.flush()
assert h.pread({SUB_BLOCK}, {SUB_BLOCK}) == bytes(150) + b'\\xab' * ({SUB_BLOCK} - 150)
assert h.pread(4, {10 * MiB}) == b'fua' + bytes([{image.data[10 * MiB + 3]}])
print('ok')
"""
    assert run("nbdsh", "-u", uri, "-c", script).stdout.split() == ["ok"]
    model = bytearray(image.data)
    model[SUB_BLOCK : 4 * SUB_BLOCK] = b"\xab" * 3 * SUB_BLOCK
    model[100 : 100 + SUB_BLOCK + 50] = bytes(SUB_BLOCK + 50)
    model[2 * SUB_BLOCK : 3 * SUB_BLOCK] = bytes(SUB_BLOCK)
    model[10 * MiB : 10 * MiB + 3] = b"fua"
    assert overlay.read(0, overlay.size) == model
    # the flush made the data and the dirty map durable: a second instance sees them
    with Overlay.open(overlay.directory, pool) as again:
        assert again.read(0, again.size) == model
        assert again.dirty_ranges() == [(0, 4 * SUB_BLOCK), (10 * MiB, SUB_BLOCK)]


def test_export_names_are_capabilities(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay
) -> None:
    uri = server.add_export("copy", overlay)
    name, secret = uri.rsplit("/", 1)[1].split(".")
    assert name == "copy" and len(secret) >= 43  # 256 bits
    base = f"nbd://127.0.0.1:{server.port}/"
    for wrong in ("copy", "copy." + "A" * len(secret), "copy." + secret[:-1], "other"):
        proc = run("nbdinfo", base + wrong, check=False)
        assert proc.returncode != 0 and "copy." + secret not in proc.stderr
    assert run("nbdinfo", "--size", uri).stdout.strip() == str(overlay.size)
    server.add_export("public", ImageBackend(pool, image.manifest), read_only=True, secret="")
    listing = run("nbdinfo", "--list", "--json", base).stdout
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["public"]
    given = server.add_export("given", overlay, secret="s3cret-from-the-catalog")
    assert given.endswith("/given.s3cret-from-the-catalog")


def test_no_open_export_on_a_non_loopback_address(overlay: Overlay) -> None:
    srv = NbdServer("0.0.0.0", 0)
    assert not srv.loopback and NbdServer("localhost", 0).loopback
    with pytest.raises(InvalidInput, match="loopback"):
        srv.add_export("open", overlay, secret="")
    uri = srv.add_export("capability", overlay)
    assert ".".join(uri.split(".")[-2:]).count(".") == 1  # NAME.SECRET
    srv.stop()  # never started: nothing to do


def test_bad_export_arguments(server: NbdServer, overlay: Overlay) -> None:
    for bad in ("", "a.b", "a/b", "-x", "x" * 65, "naïve"):
        with pytest.raises(InvalidInput):
            server.add_export(bad, overlay)
    with pytest.raises(InvalidInput):
        server.add_export("short", overlay, secret="tooshort")
    server.add_export("once", overlay)
    with pytest.raises(AlreadyExists):
        server.add_export("once", overlay)
    with pytest.raises(NotFound):
        server.remove_export("never")
    (info,) = server.exports()
    assert info.name == "once" and info.size == overlay.size and info.connections == 0
    assert info.uri == server.uri("once")


def test_remove_export_disconnects_its_clients(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay
) -> None:
    uri = server.add_export("copy", overlay)
    client = subprocess.Popen(
        [
            tool("nbdsh"),
            "-u",
            uri,
            "-c",
            "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
            "try:\n    h.pread(512, 0)\n    print('still served')\n"
            "except nbd.Error:\n    print('disconnected')\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=tool_env(),
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "ready", "nbdsh: apt-get install python3-libnbd"
        assert server.exports()[0].connections == 1
        server.remove_export("copy")
        assert server.exports() == []
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "disconnected"
    finally:
        client.communicate(timeout=30)
    assert run("nbdinfo", uri, check=False).returncode != 0


def test_a_corrupt_chunk_is_an_io_error_never_served(
    server: NbdServer, pool: ChunkPool, image: Image
) -> None:
    digest = image.manifest.chunks[2]
    assert digest is not None
    path = chunk_file(pool, digest)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(blob)
    uri = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    before = image.data[VOLUME_CHUNK - 4 : VOLUME_CHUNK]
    good = image.data[2 * VOLUME_CHUNK : 2 * VOLUME_CHUNK + 4096]
    bad = 3 * VOLUME_CHUNK - 4096  # in the chunk's last 64 KiB block, the corrupt one
    script = (
        f"print(h.pread(4, {VOLUME_CHUNK - 4}) == {before!r})\n"
        f"for offset in ({bad}, {bad}):\n"
        "    try:\n"
        "        h.pread(4096, offset)\n"
        "        print('served')\n"
        "    except nbd.Error as e:\n"
        "        print(e.errno)\n"
        f"print(h.pread(4096, {2 * VOLUME_CHUNK}) == {good!r})\n"
    )
    # Twice EIO: a bad block is never kept, the second read checks it again. Blocks are
    # verified one by one, so the chunk's good blocks are still served.
    out = run("nbdsh", "-u", uri, "-c", script).stdout.split()
    assert out == ["True", "EIO", "EIO", "True"]


# --- a raw client for what real clients never send ------------------------------------


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbdproto.NBDMAGIC, nbdproto.IHAVEOPT)
        assert flags == nbdproto.FLAG_FIXED_NEWSTYLE | nbdproto.FLAG_NO_ZEROES
        self.sock.sendall(
            struct.pack(">I", nbdproto.FLAG_C_FIXED_NEWSTYLE | nbdproto.FLAG_C_NO_ZEROES)
        )

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError("server hung up")
            buf += part
        return buf

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; the replies up to the final one (ACK or an error)."""
        self.sock.sendall(struct.pack(">QII", nbdproto.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
            assert magic == nbdproto.OPT_REPLY_MAGIC and opt == option
            replies.append((kind, self.recv(length)))
            if kind not in (nbdproto.REP_SERVER, nbdproto.REP_INFO, nbdproto.REP_META_CONTEXT):
                return replies

    def request(self, command: int, offset: int, length: int, data: bytes = b"") -> int:
        self.sock.sendall(
            struct.pack(">IHHQQI", nbdproto.REQUEST_MAGIC, 0, command, 7, offset, length)
        )
        self.sock.sendall(data)
        magic, error, handle = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbdproto.SIMPLE_REPLY_MAGIC and handle == 7
        if command == nbdproto.CMD_READ and error == 0:
            self.recv(length)
        return int(error)

    def structured(
        self, command: int, offset: int, length: int, flags: int = 0
    ) -> tuple[int, bytes]:
        """Send a request; (type, payload) of its one structured reply chunk (marked done)."""
        head = struct.pack(">IHHQQI", nbdproto.REQUEST_MAGIC, flags, command, 8, offset, length)
        self.sock.sendall(head)
        magic, rflags, kind, handle, n = struct.unpack(">IHHQI", self.recv(20))
        assert magic == nbdproto.STRUCTURED_REPLY_MAGIC and handle == 8
        assert rflags & nbdproto.REPLY_FLAG_DONE
        return kind, self.recv(n)

    def close(self) -> None:
        self.sock.close()


def meta_payload(name: str, *queries: str) -> bytes:
    """The data of NBD_OPT_LIST/SET_META_CONTEXT: export name, then the queries."""
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def go_payload(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def test_protocol_edges_with_a_raw_client(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay
) -> None:
    uri = server.add_export("copy", overlay)
    wire = uri.rsplit("/", 1)[1]
    size = overlay.size
    client = RawClient(server.port)
    try:
        assert client.option(nbdproto.OPT_STRUCTURED_REPLY, b"x")[0][0] == nbdproto.REP_ERR_INVALID
        assert client.option(nbdproto.OPT_STARTTLS)[0][0] == nbdproto.REP_ERR_UNSUP
        assert client.option(nbdproto.OPT_LIST, b"junk")[0][0] == nbdproto.REP_ERR_INVALID
        assert client.option(nbdproto.OPT_GO, b"\x00\x00")[0][0] == nbdproto.REP_ERR_INVALID
        assert (
            client.option(nbdproto.OPT_INFO, go_payload("copy"))[0][0] == nbdproto.REP_ERR_UNKNOWN
        )
        info = client.option(nbdproto.OPT_INFO, go_payload(wire, nbdproto.INFO_BLOCK_SIZE))
        assert [kind for kind, _ in info] == [
            nbdproto.REP_INFO,
            nbdproto.REP_INFO,
            nbdproto.REP_ACK,
        ]
        assert struct.unpack(">HQH", info[0][1])[:2] == (nbdproto.INFO_EXPORT, size)
        # the oldest way in: NBD_OPT_EXPORT_NAME, answered with size and flags
        client.sock.sendall(
            struct.pack(">QII", nbdproto.IHAVEOPT, nbdproto.OPT_EXPORT_NAME, len(wire))
        )
        client.sock.sendall(wire.encode())
        got_size, flags = struct.unpack(">QH", client.recv(10))
        assert got_size == size and not flags & nbdproto.FLAG_READ_ONLY
        assert client.request(nbdproto.CMD_READ, size - 10, 11) == nbdproto.EINVAL
        assert client.request(nbdproto.CMD_WRITE, size - 1, 2, b"xy") == nbdproto.ENOSPC
        assert client.request(nbdproto.CMD_WRITE_ZEROES, size, 1) == nbdproto.ENOSPC
        assert client.request(nbdproto.CMD_TRIM, size + 1, 1) == nbdproto.EINVAL
        assert client.request(99, 0, 0) == nbdproto.EINVAL
        assert client.request(nbdproto.CMD_WRITE, 0, 2, b"ok") == 0
        assert client.request(nbdproto.CMD_FLUSH, 0, 0) == 0
        assert overlay.read(0, 2) == b"ok"
        client.sock.sendall(b"\x00" * 28)  # bad request magic: the server hangs up
        with pytest.raises((EOFError, ConnectionError)):
            client.recv(1)
    finally:
        client.close()
    # an unknown name with NBD_OPT_EXPORT_NAME: hang-up, the only refusal it has
    client = RawClient(server.port)
    try:
        client.sock.sendall(
            struct.pack(">QII", nbdproto.IHAVEOPT, nbdproto.OPT_EXPORT_NAME, 4) + b"copy"
        )
        with pytest.raises((EOFError, ConnectionError)):
            client.recv(1)
    finally:
        client.close()
    client = RawClient(server.port)
    try:
        assert client.option(nbdproto.OPT_ABORT)[0][0] == nbdproto.REP_ACK
    finally:
        client.close()


# --- idle connections never lock a valid client out ------------------------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` (a state of the server, not the clock) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def idle_connections(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``count`` connections from address ``source`` that never answer the server's hello."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def test_idle_connections_from_one_address_do_not_lock_out_a_valid_client(
    server: NbdServer, pool: ChunkPool, image: Image
) -> None:
    uri = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    idle = idle_connections(server.port, 256)
    try:
        wait_until(lambda: server.connection_stats().accepted == 256, "256 connections counted")
        stats = server.connection_stats()
        assert stats.pending == nbd.MAX_PENDING_PER_SOURCE == 16
        assert stats.pending_by_source == {"127.0.0.1": 16} and stats.evicted == 240
        assert run("nbdinfo", "--size", uri).stdout.strip() == str(len(image.data))
        info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert info["virtual-size"] == len(image.data)
    finally:
        for sock in idle:
            sock.close()


def test_idle_connections_filling_the_global_limit_do_not_lock_out_a_valid_client(
    server: NbdServer, pool: ChunkPool, image: Image
) -> None:
    uri = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    sources = [f"127.0.0.{i}" for i in range(2, 18)]  # 16 addresses x 16 = 256 connections
    idle = [s for source in sources for s in idle_connections(server.port, 16, source)]
    try:
        wait_until(lambda: server.connection_stats().accepted == 256, "256 connections counted")
        stats = server.connection_stats()
        assert stats.pending == nbd.MAX_PENDING == 128 and stats.evicted == 128
        assert max(stats.pending_by_source.values()) <= 16
        assert run("nbdinfo", "--size", uri).stdout.strip() == str(len(image.data))
        assert server.connection_stats().established == 0  # nbdinfo has gone again
    finally:
        for sock in idle:
            sock.close()


def test_a_handshake_not_finished_in_time_is_dropped(pool: ChunkPool, image: Image) -> None:
    with NbdServer("127.0.0.1", 0, handshake_timeout=0.5) as srv:
        (sock,) = idle_connections(srv.port, 1)
        sock.settimeout(30)
        hello = sock.recv(18)
        assert hello.startswith(struct.pack(">Q", nbdproto.NBDMAGIC))
        assert sock.recv(1) == b""  # the server hung up: this client said nothing in time
        sock.close()
        wait_until(lambda: srv.connection_stats().pending == 0, "the idle connection dropped")
        assert srv.connection_stats().evicted == 0


def test_established_connections_keep_the_global_limit(
    pool: ChunkPool, image: Image, overlay: Overlay
) -> None:
    with NbdServer("127.0.0.1", 0, max_connections=1) as srv:
        uri = srv.add_export("copy", overlay, secret="")
        first = RawClient(srv.port)
        try:
            assert first.option(nbdproto.OPT_GO, go_payload("copy"))[-1][0] == nbdproto.REP_ACK
            wait_until(lambda: srv.connection_stats().established == 1, "one established")
            assert run("nbdinfo", "--size", uri, check=False).returncode != 0
        finally:
            first.close()
        wait_until(lambda: srv.connection_stats().established == 0, "the first one gone")
        assert run("nbdinfo", "--size", uri).stdout.strip() == str(overlay.size)


# --- block status, structured replies, and what a crash keeps ----------------------------


def test_block_status_shows_the_holes_to_nbdinfo_and_qemu_img(
    server: NbdServer, pool: ChunkPool, image: Image, overlay: Overlay, tmp_path: Path
) -> None:
    chunk = VOLUME_CHUNK
    ro = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    rw = server.add_export("copy", overlay)
    tail = len(image.data) - 2 * chunk

    def nbd_map(uri: str) -> list[tuple[int, int, int]]:
        out = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
        return [(e["offset"], e["length"], e["type"]) for e in out]

    hole = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO
    assert nbd_map(ro) == [(0, chunk, 0), (chunk, chunk, hole), (2 * chunk, tail, 0)]
    run("nbdsh", "-u", rw, "-c", f"h.pwrite(b'x' * 10, {chunk + 2 * SUB_BLOCK + 5})")
    assert nbd_map(rw) == [
        (0, chunk, 0),
        (chunk, 2 * SUB_BLOCK, hole),
        (chunk + 2 * SUB_BLOCK, SUB_BLOCK, 0),
        (chunk + 3 * SUB_BLOCK, chunk - 3 * SUB_BLOCK, hole),
        (2 * chunk, tail, 0),
    ]
    mapped = json.loads(run("qemu-img", "map", "--output=json", rw).stdout)
    zeros = [(m["start"], m["length"]) for m in mapped if m["zero"] and not m["data"]]
    assert zeros == [(chunk, 2 * SUB_BLOCK), (chunk + 3 * SUB_BLOCK, chunk - 3 * SUB_BLOCK)]
    # and the copies made through it hold the same bytes
    model = bytearray(image.data)
    model[chunk + 2 * SUB_BLOCK + 5 : chunk + 2 * SUB_BLOCK + 15] = b"x" * 10
    for copier in (["qemu-img", "convert", "-f", "raw", "-O", "raw"], ["nbdcopy"]):
        out = tmp_path / "out.raw"
        out.unlink(missing_ok=True)
        run(*copier, rw, str(out))
        assert out.read_bytes() == model


def test_structured_replies_and_block_status_edges_with_a_raw_client(
    server: NbdServer, pool: ChunkPool, image: Image
) -> None:
    wire = server.add_export("replica", ImageBackend(pool, image.manifest), read_only=True)
    wire = wire.rsplit("/", 1)[1]
    size = len(image.data)
    # Without structured replies, no metadata context can be chosen.
    client = RawClient(server.port)
    try:
        meta = meta_payload(wire, nbdproto.BASE_ALLOCATION)
        assert client.option(nbdproto.OPT_SET_META_CONTEXT, meta)[0][0] == nbdproto.REP_ERR_INVALID
        assert client.option(nbdproto.OPT_GO, go_payload(wire))[-1][0] == nbdproto.REP_ACK
        assert client.request(nbdproto.CMD_BLOCK_STATUS, 0, 4096) == nbdproto.EINVAL  # no context
    finally:
        client.close()
    client = RawClient(server.port)
    try:
        assert client.option(nbdproto.OPT_STRUCTURED_REPLY)[0][0] == nbdproto.REP_ACK
        listed = client.option(nbdproto.OPT_LIST_META_CONTEXT, meta_payload(wire))
        assert [(k, d[4:]) for k, d in listed] == [
            (nbdproto.REP_META_CONTEXT, b"base:allocation"),
            (nbdproto.REP_ACK, b""),
        ]
        unknown = meta_payload("replica.wrong-secret-0123456789", nbdproto.BASE_ALLOCATION)
        assert (
            client.option(nbdproto.OPT_SET_META_CONTEXT, unknown)[0][0] == nbdproto.REP_ERR_UNKNOWN
        )
        chosen = client.option(nbdproto.OPT_SET_META_CONTEXT, meta_payload(wire, "base:allocation"))
        assert chosen[0] == (nbdproto.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")
        assert client.option(nbdproto.OPT_GO, go_payload(wire))[-1][0] == nbdproto.REP_ACK
        chunk = VOLUME_CHUNK
        assert client.structured(nbdproto.CMD_BLOCK_STATUS, 0, 3 * chunk) == (
            nbdproto.REPLY_TYPE_BLOCK_STATUS,
            struct.pack(">IIIIIII", 1, chunk, 0, chunk, 3, chunk, 0),
        )
        one = client.structured(
            nbdproto.CMD_BLOCK_STATUS, 0, 3 * chunk, flags=nbdproto.CMD_FLAG_REQ_ONE
        )
        assert one == (nbdproto.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, chunk, 0))
        # beyond the end and empty: EINVAL; a read beyond the end: an error chunk, never a
        # simple reply (a structured client could not tell where its data ended)
        assert client.request(nbdproto.CMD_BLOCK_STATUS, size - 512, 1024) == nbdproto.EINVAL
        assert client.request(nbdproto.CMD_BLOCK_STATUS, 0, 0) == nbdproto.EINVAL
        kind, body = client.structured(nbdproto.CMD_READ, size - 10, 11)
        assert (kind, struct.unpack(">IH", body)) == (
            nbdproto.REPLY_TYPE_ERROR,
            (nbdproto.EINVAL, 0),
        )
        kind, body = client.structured(nbdproto.CMD_READ, 100, 50)
        assert (
            kind == nbdproto.REPLY_TYPE_OFFSET_DATA
            and body == struct.pack(">Q", 100) + (image.data[100:150])
        )
    finally:
        client.close()


def test_requests_beyond_the_end_and_unaligned_trims_with_nbdsh(
    server: NbdServer, image: Image, overlay: Overlay
) -> None:
    uri = server.add_export("copy", overlay)
    size = overlay.size
    script = f"""
import errno
h.set_strict_mode(0)  # send them anyway: the server must answer, not the client library
def attempt(op):
    try:
        op()
        return 'ok'
    except nbd.Error as e:
        return e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno]
print(attempt(lambda: h.pread(4096, {size} - 100)))
print(attempt(lambda: h.pwrite(b'x' * 4096, {size} - 100)))
print(attempt(lambda: h.zero(4096, {size} - 100)))
print(attempt(lambda: h.trim(4096, {size} - 100)))
print(attempt(lambda: h.block_status(4096, {size} - 100, lambda *a: 0)))
print(attempt(lambda: h.trim(70000, 1000)))  # unaligned at both ends, across blocks
print(attempt(lambda: h.flush()))
"""
    out = run("nbdsh", "-u", uri, "-c", script).stdout.split()
    assert out == ["EINVAL", "ENOSPC", "ENOSPC", "EINVAL", "EINVAL", "ok", "ok"]
    # The protocol's minimum block size here is 1, so an unaligned trim is a valid request:
    # it reads back as zeros, and not one byte beside it changed.
    model = bytearray(image.data)
    model[1000:71000] = bytes(70000)
    assert overlay.read(0, size) == model


SERVE_OVERLAY = """
import sys
from pathlib import Path
from tandem.appliance.nbd import NbdServer
from tandem.storage.manifest import load_manifest
from tandem.storage.overlay import Overlay
from tandem.storage.pool import ChunkPool

pool = ChunkPool(sys.argv[1])
mid = bytes.fromhex(sys.argv[2])
overlay = Overlay.create(Path(sys.argv[3]), pool, load_manifest(pool, mid), mid)
server = NbdServer("127.0.0.1", 0)
server.start()
print(server.add_export("copy", overlay), flush=True)
sys.stdin.read()  # until killed
"""


def test_every_write_before_a_flush_survives_a_kill_9_of_the_server(
    pool: ChunkPool, image: Image, tmp_path: Path
) -> None:
    directory = tmp_path / "copy"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_OVERLAY, str(pool.root), image.id.hex(), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd://"), "the server did not start"
        rng = random.Random(11)
        size = len(image.data)
        cut = size - VOLUME_CHUNK  # unflushed writes go after it, flushed ones before
        writes = []
        for _ in range(200):  # partial blocks, whole blocks, into the zero extent too
            n = rng.choice([1, 512, 4096, 5000, SUB_BLOCK, 3 * SUB_BLOCK + 7])
            writes.append((rng.randrange(cut - n), rng.randbytes(n)))
        later = [(cut + rng.randrange(VOLUME_CHUNK - 4096), rng.randbytes(4096)) for _ in range(20)]
        plan = tmp_path / "writes.pickle"
        plan.write_bytes(pickle.dumps((writes, later), protocol=4))
        script = (
            f"import pickle\nwrites, later = pickle.loads(open({str(plan)!r}, 'rb').read())\n"
            "for off, data in writes:\n    h.pwrite(data, off)\n"
            "h.zero(2 * 65536, 65536 * 10)\n"  # whole blocks: holes punched, bits kept
            "h.flush()\n"
            "for off, data in later:\n    h.pwrite(data, off)\n"
            "print('flushed')\n"
        )
        assert run("nbdsh", "-u", uri, "-c", script).stdout.split() == ["flushed"]
    finally:
        proc.kill()  # SIGKILL: no close, no flush, nothing more written
        proc.communicate(timeout=30)
    model = bytearray(image.data)
    for off, data in writes:
        model[off : off + len(data)] = data
    model[10 * SUB_BLOCK : 12 * SUB_BLOCK] = bytes(2 * SUB_BLOCK)
    with Overlay.open(directory, pool) as again:
        assert again.read(0, cut) == model[:cut]
