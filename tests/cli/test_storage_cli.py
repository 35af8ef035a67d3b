"""`tandem storage …` and `tandem demo` as an operator runs them: real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.storage.objstore import ACCESS_KEY_ENV, SECRET_KEY_ENV, ObjectStore
from tests.s3server import S3Server

TANDEM = [sys.executable, "-m", "tandem.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*TANDEM, *args], capture_output=True, text=True, timeout=300, env={**os.environ}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tandem {' '.join(args)} failed: {proc.stderr}")
    return proc


def test_capture_restore_verify_gc_through_the_cli(tmp_path: Path) -> None:
    pool, data = tmp_path / "pool", tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("hello\n")
    (data / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(5 * 1024 * 1024))
    run("storage", "init", str(pool))

    tree = json.loads(run("storage", "capture", str(pool), str(data), "--json").stdout)
    vol = json.loads(run("storage", "capture", str(pool), str(disk), "--json").stdout)
    assert tree["kind"] == "tree" and vol["kind"] == "volume"
    (data / "a.txt").write_text("changed\n")
    tree2 = json.loads(
        run("storage", "capture", str(pool), str(data), "--base", tree["manifest"], "--json").stdout
    )
    assert tree2["stats"]["bytes_read"] == len("changed\n")  # the unchanged file is not read

    diff = json.loads(
        run("storage", "diff", str(pool), tree["manifest"], tree2["manifest"], "--json").stdout
    )
    assert diff["changed"] == ["a.txt"]

    out = tmp_path / "out"
    run("storage", "restore", str(pool), tree["manifest"][:12], str(out))
    assert (out / "a.txt").read_text() == "hello\n"
    assert (out / "sub" / "b.bin").read_bytes() == (data / "sub" / "b.bin").read_bytes()
    run("storage", "restore", str(pool), vol["manifest"], str(tmp_path / "disk.out"))
    assert (tmp_path / "disk.out").read_bytes() == disk.read_bytes()

    listing = json.loads(run("storage", "list", str(pool), "--json").stdout)
    assert len(listing) == 3
    run("storage", "forget", str(pool), vol["manifest"])
    for chunk in (pool / "chunks").rglob("*"):
        if chunk.is_file():  # age them: GC spares fresh chunks a capture may be reusing
            os.utime(chunk, (1_000_000_000, 1_000_000_000))
    gc = json.loads(run("storage", "gc", str(pool), "--json").stdout)
    assert gc["chunks_removed"] == 2  # the forgotten 5 MiB volume: a 4 MiB and a 1 MiB chunk
    report = json.loads(run("storage", "verify", str(pool), "--json").stdout)
    assert report["ok"] and report["manifests"] == 2


def test_verify_exits_1_and_names_a_corrupt_chunk(tmp_path: Path) -> None:
    pool, src = tmp_path / "pool", tmp_path / "f.img"
    src.write_bytes(os.urandom(300_000))  # over PACK_BELOW: a chunk file of its own
    run("storage", "init", str(pool))
    run("storage", "capture", str(pool), str(src))
    victim = next((pool / "chunks").rglob("*" * 1 + "?" * 63))
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    proc = run("storage", "verify", str(pool), "--json", check=False)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert [b["chunk"] for b in doc["bad"]] == [victim.name]


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    proc = run("storage", "capture", str(tmp_path / "no-pool"), str(tmp_path), check=False)
    assert proc.returncode == 1
    assert "is not a chunk pool" in proc.stderr
    assert "Traceback" not in proc.stderr
    run("storage", "init", str(tmp_path / "pool"))
    proc = run(
        "storage", "restore", str(tmp_path / "pool"), "deadbeef", str(tmp_path / "x"), check=False
    )
    assert proc.returncode == 1
    assert "manifest 'deadbeef' does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_storage_commands_work_on_a_pool_in_a_bucket(
    s3_server: S3Server, s3_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ACCESS_KEY_ENV, s3_server.access_key)
    monkeypatch.setenv(SECRET_KEY_ENV, s3_server.secret_key)
    url = f"s3://{s3_store.bucket}/cli?endpoint={s3_store.endpoint}"
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "a.bin").write_bytes(os.urandom(300_000))
    run("storage", "init", url)
    one = json.loads(run("storage", "capture", url, str(data), "--json").stdout)["manifest"]
    (data / "a.bin").write_bytes(os.urandom(200_000))
    two = json.loads(run("storage", "capture", url, str(data), "--json").stdout)["manifest"]
    stats = json.loads(run("storage", "stats", url, "--json").stdout)
    assert stats["manifests"] == 2 and stats["packs"] >= 2 and stats["stored_bytes"] > 500_000
    assert json.loads(run("storage", "verify", url, "--json").stdout)["ok"]
    run("storage", "forget", url, one[:12])
    gc = json.loads(run("storage", "gc", url, "--json").stdout)
    assert gc["chunks_removed"] == 0  # the forgotten image's pack is newer than the cut-off
    assert [m["manifest"] for m in json.loads(run("storage", "list", url, "--json").stdout)] == [
        two
    ]
    run("storage", "restore", url, two, str(out))
    assert (out / "a.bin").read_bytes() == (data / "a.bin").read_bytes()
    monkeypatch.delenv(SECRET_KEY_ENV)
    bad = run("storage", "stats", url, check=False)
    assert bad.returncode != 0 and SECRET_KEY_ENV in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr + bad.stdout
