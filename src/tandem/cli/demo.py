"""`tandem demo`: a narrated run on embedded defaults that exits non-zero if anything fails.

This stage of the demo exercises the storage engine on a sample application that keeps
writing (a volume image and a file tree): capture, change, incremental capture, damage the
production copy, diff-restore, verify. It grows into the full two-site DR drill.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tandem.storage.manifest import TreeManifest, VolumeManifest
from tandem.storage.pool import ChunkPool
from tandem.storage.tree import capture_tree, restore_tree
from tandem.storage.volume import capture_volume, diff_volumes, restore_volume

from .output import handle_errors, human_bytes, stderr, stdout

MiB = 1024 * 1024


def _sample_volume(path: Path, size: int, rng: random.Random) -> None:
    with open(path, "wb") as fh:
        for i in range(size // MiB):
            fh.write(rng.randbytes(MiB) if i % 3 else (b"row %08d;" % i) * (MiB // 13) + b"x" * 5)


def _sample_tree(root: Path, rng: random.Random, files: int) -> None:
    for i in range(files):
        d = root / f"dir{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i}.txt").write_bytes(b"line %d\n" % i * rng.randrange(1, 200))
    (root / "db.bin").write_bytes(rng.randbytes(8 * MiB))


def _same_tree(a: Path, b: Path) -> bool:
    def listing(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"dir"
            for p in sorted(root.rglob("*"))
        }

    return listing(a) == listing(b)


@handle_errors
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the demo directory afterwards.")] = False,
    size_mib: Annotated[int, typer.Option(help="Size of the sample volume in MiB.")] = 256,
) -> None:
    """Run the demo on embedded defaults; exit non-zero if any step fails."""
    work = Path(tempfile.mkdtemp(prefix="tandem-demo-"))
    rng = random.Random(2026)
    rows: list[tuple[str, str, str]] = []

    def step(name: str, t0: float, detail: str) -> None:
        took = f"{time.monotonic() - t0:.2f}s"
        rows.append((name, took, detail))
        stderr.print(f"[green]✓[/] {name:38} {took:>8}  {detail}")

    try:
        pool = ChunkPool.create(work / "pool")
        vol, tree = work / "app" / "disk.img", work / "app" / "files"
        vol.parent.mkdir(parents=True)
        _sample_volume(vol, size_mib * MiB, rng)
        _sample_tree(tree, rng, 2000)

        t = time.monotonic()
        vid, v1, vs = capture_volume(pool, vol)
        step(
            "capture volume (full)",
            t,
            f"{human_bytes(vs.bytes_total)} → stored {human_bytes(vs.bytes_stored)}",
        )
        t = time.monotonic()
        tid, t1, ts = capture_tree(pool, tree)
        step(
            "capture file tree (full)",
            t,
            f"{len(t1.entries)} entries, stored {human_bytes(ts.bytes_stored)}",
        )

        # the application keeps writing
        with open(vol, "r+b") as fh:
            for _ in range(64):
                fh.seek(rng.randrange(0, size_mib * MiB - 65536) // 65536 * 65536)
                fh.write(rng.randbytes(65536))
        (tree / "dir3" / "new.txt").write_text("written after the first capture\n")
        (tree / "dir1" / "file1.txt").unlink()

        t = time.monotonic()
        vid2, v2, vs2 = capture_volume(pool, vol, base=v1, base_id=vid)
        changed = sum(n for _, n in diff_volumes(v1, v2, pool))
        step(
            "capture volume (incremental)",
            t,
            f"changed {human_bytes(changed)}, stored {human_bytes(vs2.bytes_stored)}",
        )
        t = time.monotonic()
        tid2, t2, ts2 = capture_tree(pool, tree, base=t1, base_id=tid)
        step(
            "capture file tree (incremental)",
            t,
            f"read {human_bytes(ts2.bytes_read)}, stored {human_bytes(ts2.bytes_stored)}",
        )

        # disaster: production is damaged; restore the latest images in place
        truth_vol = work / "truth.img"
        shutil.copyfile(vol, truth_vol)
        truth_tree = work / "truth-tree"
        shutil.copytree(tree, truth_tree, symlinks=True)
        with open(vol, "r+b") as fh:
            fh.seek(MiB)
            fh.write(bytes(3 * MiB))
        shutil.rmtree(tree / "dir2")
        (tree / "dir4" / "file4.txt").write_text("corrupted\n")

        t = time.monotonic()
        assert isinstance(v2, VolumeManifest) and isinstance(t2, TreeManifest)
        rv = restore_volume(pool, v2, vol)
        step(
            "diff-restore volume",
            t,
            f"wrote {human_bytes(rv.bytes_written)} of {human_bytes(rv.bytes_total)}",
        )
        t = time.monotonic()
        rt = restore_tree(pool, t2, tree)
        step(
            "diff-restore file tree",
            t,
            f"wrote {human_bytes(rt.bytes_written)} of {human_bytes(rt.bytes_total)}",
        )

        t = time.monotonic()
        ok_vol = vol.read_bytes() == truth_vol.read_bytes()
        ok_tree = _same_tree(tree, truth_tree)
        report = pool.verify({vid2: v2.chunk_ids(), tid2: t2.chunk_ids()})
        if not (ok_vol and ok_tree and report.ok):
            raise typer.Exit(1)
        step("verify data and pool", t, f"{report.chunks} chunks verified, data equal")
    finally:
        if keep:
            stderr.print(f"demo files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    table = Table("step", "time", "result", title="tandem demo")
    for r in rows:
        table.add_row(*r)
    stdout.print(table)
    stdout.print(f"all {len(rows)} steps succeeded (pid {os.getpid()})")
