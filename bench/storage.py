"""Storage benchmarks: tandem's chunk pool side by side with restic, rsync and cat.

One run generates one data set and measures both sides on it, in this order:

0. Data (deterministic seed): a volume image, half low-entropy text and half random,
   interleaved per 4 MiB; a tree of small files (1-8 KiB, 100 per directory, nested) plus
   four 64 MiB files.
1. First capture, volume and tree, against ``restic backup``.
2. Re-capture of unchanged data: the volume with its previous manifest as base against
   ``cat FILE > /dev/null``; the tree against a second ``restic backup``.
3. 1% of the volume changed, once as aligned 64 KiB runs and once as 4 KiB writes: bytes
   tandem newly stores against restic's ``data_added``, and the 64 KiB sub-blocks tandem's
   replication sends (``storage.transfer`` encodings) against rsync's literal data.
4. Diff-restore onto a copy with 1% of its 64 KiB blocks scribbled, against
   ``rsync --inplace --no-whole-file``.
5. Peak RSS of a volume capture in a child process at two sizes, against restic's.

Process-level figures (peers, child captures): wall time around the process and its peak
RSS (VmHWM, see ``common.run_measured``). In-process tandem figures come from its own
CaptureStats / RestoreStats.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar, cast

from bench.common import (
    MB,
    PEER_MISSING,
    Config,
    DataSource,
    GiB,
    KiB,
    MiB,
    Report,
    Row,
    Value,
    file_digest,
    fmt_bytes,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    fmt_size,
    have,
    log,
    python_child,
    restic_summary,
    rsync_literal_bytes,
    run_measured,
    settle,
    tree_size,
)
from tandem.errors import TandemError
from tandem.storage.manifest import TreeManifest, VolumeManifest, load_manifest
from tandem.storage.pool import ChunkPool
from tandem.storage.transfer import chunks_to_offer, encode_for_receiver, previous_at_same_offset
from tandem.storage.volume import CaptureStats, capture_volume, restore_volume

T = TypeVar("T")

SEGMENT = 4 * MiB  # compressible / random interleave of the volume
SUB_BLOCK = 64 * KiB  # tandem's transfer and restore grain
SMALL_WRITE = 4 * KiB
CHANGE_FRACTION = 0.01
FILES_PER_DIR = 100
LARGE_FILES = 4
LARGE_FILE_SIZE = 64 * MiB
RECAPTURE_ROUNDS = 7  # best of, for the warm re-capture against cat

S1 = "1 · first capture"
S2 = "2 · re-capture of unchanged data"
S3 = "3 · 1% of the volume changed"
S4 = "4 · diff-restore onto a target differing by 1%"
S5 = "5 · peak RSS while capturing the volume"

# Child processes import tandem only, so their RSS is tandem's and not the benchmark's.
_CAPTURE_CHILD = """\
import json, sys
from tandem.storage.pool import ChunkPool
from tandem.storage.volume import capture_volume
mid, _, stats = capture_volume(ChunkPool.create(sys.argv[1]), sys.argv[2])
print(json.dumps({"id": mid.hex(), "stats": stats.as_dict()}))
"""
_BASELINE_CHILD = """\
import json
import tandem.storage.pool, tandem.storage.volume
print(json.dumps({}))
"""


@dataclass
class Got(Generic[T]):
    """A measurement that ran (``value``) or did not (``why``: not installed, failed)."""

    value: T | None = None
    why: str = PEER_MISSING

    def show(self, fmt: Callable[[T], str]) -> str:
        return fmt(self.value) if self.value is not None else self.why

    def num(self, fn: Callable[[T], float]) -> float | None:
        return fn(self.value) if self.value is not None else None


def attempt(what: str, fn: Callable[[], T]) -> Got[T]:
    """Run one measurement; a failure becomes a short text for the table, not a crash."""
    try:
        return Got(fn())
    except (TandemError, RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
        log(f"[red]{what} failed:[/red] {exc}")
        return Got(why=f"{what} failed: {str(exc)[:60]}")


def times(value: float, basis: float) -> str:
    return f"{value / basis:.2f}×" if basis else "—"


# --- peers ----------------------------------------------------------------------------


@dataclass
class PeerBackup:
    seconds: float
    max_rss: int
    cpu_seconds: float  # user + system (restic's own threads)
    data_added: int  # restic's summary figure: plaintext of new blobs, before compression
    repo_growth: int  # bytes the repository grew on disk (compressed packs, index, snapshot)


class Restic:
    """A restic repository in the work directory, with its cache there too."""

    def __init__(self, root: Path, scratch: Path) -> None:
        self.repo = root / "restic-repo"
        self.scratch = scratch
        self.env = {
            "RESTIC_REPOSITORY": str(self.repo),
            "RESTIC_PASSWORD": "tandem-bench",
            "RESTIC_CACHE_DIR": str(root / "restic-cache"),
        }

    def init(self) -> None:
        run_measured(["restic", "init"], scratch=self.scratch, env=self.env).check("restic init")

    def backup(self, path: Path) -> PeerBackup:
        before = tree_size(self.repo)
        cmd = ["restic", "backup", "--json", "--quiet", "--host", "bench", str(path)]
        res = run_measured(cmd, scratch=self.scratch, env=self.env).check("restic backup")
        added = restic_summary(res.stdout).get("data_added")
        if not isinstance(added, int):
            raise RuntimeError("restic's summary has no data_added")
        return PeerBackup(
            seconds=res.seconds,
            max_rss=res.max_rss,
            cpu_seconds=res.cpu_seconds,
            data_added=added,
            repo_growth=tree_size(self.repo) - before,
        )


@dataclass
class RsyncRun:
    seconds: float
    literal: int  # bytes rsync sent as literal data (not matched in the basis file)


def rsync_delta(source: Path, dest: Path, scratch: Path, *, inplace: bool) -> RsyncRun:
    """Sync ``source`` onto the existing ``dest`` with the delta algorithm, on this machine."""
    cmd = ["rsync", "--stats", "--no-whole-file", "--ignore-times"]
    if inplace:
        cmd.append("--inplace")
    res = run_measured([*cmd, str(source), str(dest)], scratch=scratch).check("rsync")
    return RsyncRun(seconds=res.seconds, literal=rsync_literal_bytes(res.stdout))


# --- data -----------------------------------------------------------------------------


def write_volume(path: Path, size: int, data: DataSource, label: str) -> None:
    """Even 4 MiB segments are low-entropy text, odd ones random."""
    with open(path, "wb") as fh:
        for i, off in enumerate(range(0, size, SEGMENT)):
            n = min(SEGMENT, size - off)
            fh.write(data.text(label, i, n) if i % 2 == 0 else data.random(label, i, n))


def write_tree(root: Path, files: int, data: DataSource) -> int:
    """Small files in ``d<top>/d<leaf>/`` (100 files a leaf, 100 leaves a top directory)
    and large ones in ``large/``; returns the bytes written."""
    rng = random.Random(data.rng_seed("tree-sizes"))
    total = 0
    leaf_dir = root
    for i in range(files):
        if i % FILES_PER_DIR == 0:
            leaf = i // FILES_PER_DIR
            leaf_dir = root / f"d{leaf // FILES_PER_DIR:03d}" / f"d{leaf % FILES_PER_DIR:02d}"
            leaf_dir.mkdir(parents=True, exist_ok=True)
        n = rng.randint(1 * KiB, 8 * KiB)
        blob = data.text("tree", i, n) if i % 2 == 0 else data.random("tree", i, n)
        (leaf_dir / f"f{i:07d}.dat").write_bytes(blob)
        total += n
    (root / "large").mkdir(parents=True, exist_ok=True)
    for k in range(LARGE_FILES):
        write_volume(root / "large" / f"big{k}.img", LARGE_FILE_SIZE, data, f"large{k}")
        total += LARGE_FILE_SIZE
    return total


def pick_offsets(size: int, grain: int, rng: random.Random) -> list[int]:
    """Distinct ``grain``-aligned offsets covering CHANGE_FRACTION of ``size``."""
    count = max(1, round(size * CHANGE_FRACTION / grain))
    return sorted(grain * b for b in rng.sample(range(size // grain), count))


def overwrite(path: Path, offsets: list[int], length: int, data: DataSource, label: str) -> int:
    """Write fresh random bytes at each offset; returns the bytes changed."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for k, off in enumerate(offsets):
            os.pwrite(fd, data.random(label, k, length), off)
    finally:
        os.close(fd)
    return len(offsets) * length


class CaptureTree(Protocol):
    """The signature of ``tandem.storage.tree.capture_tree``."""

    def __call__(
        self,
        pool: ChunkPool,
        root: Path | str,
        *,
        base: TreeManifest | None = None,
        base_id: bytes | None = None,
    ) -> tuple[bytes, TreeManifest, CaptureStats]: ...


def load_capture_tree() -> Got[CaptureTree]:
    """``capture_tree``, imported late: tree.py is being written alongside this benchmark,
    and a missing or broken module must cost two table cells, not the run."""
    try:
        module = importlib.import_module("tandem.storage.tree")
    except Exception as exc:  # anything a half-written module may raise on import
        return Got(why=f"tree.py unavailable ({type(exc).__name__})")
    fn = getattr(module, "capture_tree", None)
    if fn is None:
        return Got(why="tree.py has no capture_tree yet")
    return Got(cast(CaptureTree, fn))


# --- the run --------------------------------------------------------------------------


@dataclass
class TreeCapture:
    id: bytes
    manifest: TreeManifest
    stats: CaptureStats


class StorageBench:
    """The storage section; each ``step_*`` adds its rows and keeps what later steps need."""

    def __init__(self, cfg: Config, report: Report) -> None:
        self.cfg = cfg
        self.report = report
        self.size = cfg.size
        self.data = DataSource(cfg.seed)
        self.root = cfg.workdir / "storage"
        self.scratch = self.root / "scratch"
        self.volume = self.root / "volume" / "vol.img"
        self.tree = self.root / "tree"
        self.mirror = self.root / "mirror" / "vol.img"
        self.pool_dir = self.root / "pool-volume"
        self.tree_pool_dir = self.root / "pool-tree"
        self.has_rsync = have("rsync")
        self.restic = Restic(self.root, self.scratch) if have("restic") else None
        self.tree_bytes = 0
        # Filled in by the steps, in order.
        self.pool: ChunkPool | None = None
        self.manifest: VolumeManifest | None = None
        self.manifest_id = b""
        self.first_rss = 0
        self.restic_first: Got[PeerBackup] = Got()
        self.tree_first: Got[TreeCapture] = Got(why="not run")

    def row(
        self,
        section: str,
        measure: str,
        *,
        tandem: str,
        peer: str,
        ratio: str = "—",
        target: str = "—",
        values: dict[str, Value] | None = None,
    ) -> None:
        """Add a table row; ``values`` are its raw numbers, for --json."""
        self.report.add(Row(section, measure, tandem, peer, ratio, target, values or {}))

    def restic_backup(self, path: Path) -> Got[PeerBackup]:
        if self.restic is None:
            return Got()
        settle()
        restic = self.restic
        return attempt("restic", lambda: restic.backup(path))

    def rsync(self, source: Path, dest: Path, *, inplace: bool) -> Got[RsyncRun]:
        if not self.has_rsync:
            return Got()
        settle()
        return attempt("rsync", lambda: rsync_delta(source, dest, self.scratch, inplace=inplace))

    def volume_state(self) -> tuple[ChunkPool, VolumeManifest, bytes]:
        assert self.pool is not None and self.manifest is not None
        return self.pool, self.manifest, self.manifest_id

    def need_bytes(self) -> int:
        # Volume, rsync's basis copy and its temporary file, plus the pool and the restic
        # repository (a compressed first capture and two changed captures each), plus the
        # tree with its pool and repository.
        tree_estimate = self.cfg.files * 5 * KiB + LARGE_FILES * LARGE_FILE_SIZE
        return int(6.5 * self.size + 3 * tree_estimate + GiB)

    # steps -----------------------------------------------------------------------------

    def run(self) -> None:
        for d in (self.scratch, self.volume.parent, self.tree, self.mirror.parent):
            d.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < self.need_bytes():
            raise SystemExit(
                f"{self.root}: {fmt_size(free)} free, this run needs about "
                f"{fmt_size(self.need_bytes())}; lower --size-gib or point --workdir elsewhere"
            )
        self.step_generate()
        if self.restic is not None:
            self.restic.init()
        self.step_first_capture()
        self.step_first_tree_capture()
        self.step_recapture()
        self.step_tree_recapture()
        self.step_changes()
        self.step_diff_restore()
        self.step_peak_rss()

    def step_generate(self) -> None:
        log(f"generating a {fmt_size(self.size)} volume and a tree of {self.cfg.files:,} files")
        t0 = time.monotonic()
        write_volume(self.volume, self.size, self.data, "volume")
        self.tree_bytes = write_tree(self.tree, self.cfg.files, self.data)
        settle()
        dirs = -(-self.cfg.files // FILES_PER_DIR)
        self.report.context.append(
            f"data (seed {self.cfg.seed}): volume {fmt_size(self.size)}, low-entropy text "
            f"(zstd-1 ≈ 2:1) and random bytes alternating per {fmt_size(SEGMENT)}; tree "
            f"{self.cfg.files:,} files of 1-8 KiB (half text, half random) in {dirs:,} "
            f"directories + {LARGE_FILES} × {fmt_size(LARGE_FILE_SIZE)}, "
            f"{fmt_bytes(self.tree_bytes)} in all."
        )
        log(f"data ready in {time.monotonic() - t0:.1f} s")

    def step_first_capture(self) -> None:
        log("1: first capture of the volume (tandem in a child process, for its RSS)")
        settle()
        result, proc = python_child(
            _CAPTURE_CHILD, str(self.pool_dir), str(self.volume), scratch=self.scratch
        )
        stats = CaptureStats(**result["stats"])
        self.first_rss = proc.max_rss
        self.pool = ChunkPool(self.pool_dir)
        self.manifest_id = bytes.fromhex(result["id"])
        manifest = load_manifest(self.pool, self.manifest_id)
        assert isinstance(manifest, VolumeManifest)
        self.manifest = manifest
        log("1: restic backup of the volume")
        peer = self.restic_first = self.restic_backup(self.volume)

        what = "volume"
        speed = self.size / stats.seconds
        peer_speed = peer.num(lambda p: self.size / p.seconds)
        self.row(
            S1,
            f"{what}: throughput",
            tandem=fmt_rate(self.size, stats.seconds),
            peer=peer.show(lambda p: f"restic {fmt_rate(self.size, p.seconds)}"),
            ratio=fmt_ratio(speed, peer_speed, "restic"),
            values=dict(
                bytes=self.size, tandem_seconds=stats.seconds, restic_seconds=peer.num(_seconds)
            ),
        )
        self.row(
            S1,
            f"{what}: bytes stored",
            tandem=fmt_bytes(stats.bytes_stored),
            peer=peer.show(lambda p: f"restic repo +{fmt_bytes(p.repo_growth)}"),
            ratio=fmt_ratio(stats.bytes_stored, peer.num(_growth), "restic"),
            values=dict(
                tandem_stored=stats.bytes_stored,
                restic_repo_growth=peer.num(_growth),
                restic_data_added=peer.num(_added),
            ),
        )

    def step_first_tree_capture(self) -> None:
        log("1: first capture of the tree")
        settle()
        capture_tree = load_capture_tree()
        mine = self.tree_first = Got(why=capture_tree.why)
        if capture_tree.value is not None:
            fn = capture_tree.value
            pool = ChunkPool.create(self.tree_pool_dir)

            def capture() -> TreeCapture:
                return TreeCapture(*fn(pool, self.tree))

            mine = self.tree_first = attempt("tandem capture_tree", capture)
        log("1: restic backup of the tree")
        peer = self.restic_backup(self.tree)

        size = self.tree_bytes
        what = "tree"
        self.row(
            S1,
            f"{what}: throughput",
            tandem=mine.show(lambda m: fmt_rate(size, m.stats.seconds)),
            peer=peer.show(lambda p: f"restic {fmt_rate(size, p.seconds)}"),
            ratio=fmt_ratio(
                mine.num(lambda m: size / m.stats.seconds),
                peer.num(lambda p: size / p.seconds),
                "restic",
            ),
            values=dict(
                bytes=size,
                tandem_seconds=mine.num(lambda m: m.stats.seconds),
                restic_seconds=peer.num(_seconds),
            ),
        )
        stored = mine.num(lambda m: m.stats.bytes_stored)
        self.row(
            S1,
            f"{what}: bytes stored",
            tandem=mine.show(lambda m: fmt_bytes(m.stats.bytes_stored)),
            peer=peer.show(lambda p: f"restic repo +{fmt_bytes(p.repo_growth)}"),
            ratio=fmt_ratio(stored, peer.num(_growth), "restic"),
            values=dict(tandem_stored=stored, restic_repo_growth=peer.num(_growth)),
        )

    def step_recapture(self) -> None:
        pool, manifest, mid = self.volume_state()
        log(f"2: re-capture of the unchanged volume against cat, best of {RECAPTURE_ROUNDS}")
        settle()
        best_cat = best_tandem = float("inf")
        for _ in range(RECAPTURE_ROUNDS):
            cat = run_measured(["cat", str(self.volume)], scratch=self.scratch, stdout=False)
            best_cat = min(best_cat, cat.check("cat").seconds)
            _, _, stats = capture_volume(pool, self.volume, base=manifest, base_id=mid)
            best_tandem = min(best_tandem, stats.seconds)
        self.row(
            S2,
            "volume, base = previous manifest",
            tandem=fmt_rate(self.size, best_tandem),
            peer=f"cat {fmt_rate(self.size, best_cat)}",
            ratio=fmt_ratio(best_cat, best_tandem, "cat speed"),
            target="≥ 0.7× cat speed",
            values=dict(bytes=self.size, tandem_seconds=best_tandem, cat_seconds=best_cat),
        )

    def step_tree_recapture(self) -> None:
        log("2: re-capture of the unchanged tree")
        first = self.tree_first
        mine: Got[float] = Got(why=first.why)
        capture_tree = load_capture_tree()
        if first.value is not None and capture_tree.value is not None:
            fn, base = capture_tree.value, first.value
            pool = ChunkPool(self.tree_pool_dir)

            def capture() -> float:
                _, _, stats = fn(pool, self.tree, base=base.manifest, base_id=base.id)
                return stats.seconds

            mine = attempt("tandem capture_tree", capture)
        log("2: second restic backup of the tree")
        peer = self.restic_backup(self.tree)
        self.row(
            S2,
            "tree, base = previous manifest",
            tandem=mine.show(fmt_seconds),
            peer=peer.show(lambda p: f"restic {fmt_seconds(p.seconds)}"),
            ratio=fmt_ratio(mine.value, peer.num(_seconds), "restic time"),
            target="< 1× restic time",
            values=dict(tandem_seconds=mine.value, restic_seconds=peer.num(_seconds)),
        )

    def step_changes(self) -> None:
        if self.has_rsync:
            shutil.copyfile(self.volume, self.mirror)  # rsync's basis: the volume as it was
        self.change_case("64 KiB runs", SUB_BLOCK, "change-64k", "≤ 1.1× changed")
        self.change_case("4 KiB writes", SMALL_WRITE, "change-4k", "— (report)")
        self.mirror.unlink(missing_ok=True)

    def change_case(self, name: str, grain: int, label: str, target: str) -> None:
        pool, base, base_id = self.volume_state()
        rng = random.Random(self.data.rng_seed(label))
        offsets = pick_offsets(self.size, grain, rng)
        changed = overwrite(self.volume, offsets, grain, self.data, label)
        what = f"{name}, {fmt_bytes(changed)}"
        log(f"3: {what}: tandem capture with base")
        settle()
        mid, manifest, stats = capture_volume(pool, self.volume, base=base, base_id=base_id)
        delta = wire_bytes(pool, base, manifest)
        self.manifest, self.manifest_id = manifest, mid
        log(f"3: {what}: restic incremental backup")
        peer = self.restic_backup(self.volume)
        log(f"3: {what}: rsync --no-whole-file onto the previous copy")
        sync = self.rsync(self.volume, self.mirror, inplace=False)

        self.row(
            S3,
            f"{what}: newly stored",
            tandem=fmt_bytes(stats.bytes_stored),
            peer=peer.show(
                lambda p: f"restic {fmt_bytes(p.data_added)} ({times(p.data_added, changed)})"
            ),
            ratio=fmt_ratio(stats.bytes_stored, changed, "changed"),
            target=target,
            values=dict(
                changed=changed,
                tandem_stored=stats.bytes_stored,
                tandem_new=stats.bytes_new,
                restic_data_added=peer.num(_added),
                restic_repo_growth=peer.num(_growth),
            ),
        )
        self.row(
            S3,
            f"{what}: replication delta",
            tandem=fmt_bytes(delta),
            peer=sync.show(
                lambda s: f"rsync literal {fmt_bytes(s.literal)} ({times(s.literal, changed)})"
            ),
            ratio=fmt_ratio(delta, changed, "changed"),
            target="— (report)",
            values=dict(
                changed=changed, tandem_delta=delta, rsync_literal=sync.num(lambda s: s.literal)
            ),
        )
        self.row(
            S3,
            f"{what}: capture time",
            tandem=fmt_seconds(stats.seconds),
            peer=peer.show(lambda p: f"restic {fmt_seconds(p.seconds)}"),
            ratio=fmt_ratio(stats.seconds, peer.num(_seconds), "restic time"),
            values=dict(tandem_seconds=stats.seconds, restic_seconds=peer.num(_seconds)),
        )

    def step_diff_restore(self) -> None:
        pool, manifest, _ = self.volume_state()
        target = self.root / "restore" / "tandem.img"
        rsync_target = self.root / "restore" / "rsync.img"
        target.parent.mkdir(exist_ok=True)
        log("4: preparing a target with 1% of its 64 KiB blocks scribbled")
        shutil.copyfile(self.volume, target)
        rng = random.Random(self.data.rng_seed("damage"))
        offsets = pick_offsets(self.size, SUB_BLOCK, rng)
        differing = overwrite(target, offsets, SUB_BLOCK, self.data, "damage")
        if self.has_rsync:
            shutil.copyfile(target, rsync_target)
        want = file_digest(self.volume)
        settle()
        log("4: tandem diff-restore")
        stats = restore_volume(pool, manifest, target)
        tandem_ok = file_digest(target) == want
        log("4: rsync --inplace --no-whole-file")
        sync = self.rsync(self.volume, rsync_target, inplace=True)
        if sync.value is not None and file_digest(rsync_target) != want:
            sync = Got(why="rsync result differs from the image")
        target.unlink()
        rsync_target.unlink(missing_ok=True)

        what = f"{fmt_bytes(differing)} differ"
        wrong = "" if tandem_ok else " (RESULT DIFFERS FROM IMAGE)"
        self.row(
            S4,
            f"{what}: bytes written",
            tandem=fmt_bytes(stats.bytes_written) + wrong,
            peer=sync.show(
                lambda s: f"rsync literal {fmt_bytes(s.literal)} ({times(s.literal, differing)})"
            ),
            ratio=fmt_ratio(stats.bytes_written, differing, "differing"),
            target="≤ 1.1× differing",
            values=dict(
                differing=differing,
                tandem_written=stats.bytes_written,
                tandem_fetched=stats.bytes_fetched,
                tandem_compared=stats.bytes_compared,
                tandem_verified=str(tandem_ok),
                rsync_literal=sync.num(lambda s: s.literal),
            ),
        )
        self.row(
            S4,
            f"{what}: time",
            tandem=fmt_seconds(stats.seconds),
            peer=sync.show(lambda s: f"rsync {fmt_seconds(s.seconds)}"),
            ratio=fmt_ratio(stats.seconds, sync.num(lambda s: s.seconds), "rsync time"),
            values=dict(tandem_seconds=stats.seconds, rsync_seconds=sync.num(lambda s: s.seconds)),
        )

    def step_peak_rss(self) -> None:
        small = max(SEGMENT, self.size // 4 // MiB * MiB)
        log(f"5: capture of {fmt_size(small)} in a child process, into a fresh pool")
        source = self.scratch / "small.img"
        with open(self.volume, "rb") as src, open(source, "wb") as dst:
            shutil.copyfileobj(src, dst, length=small)
            dst.truncate(small)
        pool_dir = self.scratch / "pool-small"
        settle()
        _, proc = python_child(_CAPTURE_CHILD, str(pool_dir), str(source), scratch=self.scratch)
        small_rss = proc.max_rss
        source.unlink()
        shutil.rmtree(pool_dir)
        _, baseline = python_child(_BASELINE_CHILD, scratch=self.scratch)

        self.row(
            S5,
            f"capture {fmt_size(small)}",
            tandem=fmt_bytes(small_rss),
            peer="—",
            target="≤ 200 MB",
            values=dict(bytes=small, tandem_rss=small_rss),
        )
        peer = self.restic_first
        self.row(
            S5,
            f"capture {fmt_size(self.size)}",
            tandem=fmt_bytes(self.first_rss),
            peer=peer.show(lambda p: f"restic {fmt_bytes(p.max_rss)}"),
            ratio=fmt_ratio(self.first_rss, peer.num(lambda p: p.max_rss), "restic"),
            target="≤ 200 MB",
            values=dict(
                bytes=self.size,
                tandem_rss=self.first_rss,
                restic_rss=peer.num(lambda p: p.max_rss),
                interpreter_rss=baseline.max_rss,
            ),
        )
        self.report.note(
            "Section 5: peak RSS is the VmHWM of the capturing process alone (a first capture "
            f"into a fresh pool); {fmt_bytes(baseline.max_rss)} of it is the interpreter with "
            f"tandem imported. From {fmt_size(small)} to {fmt_size(self.size)} it changes by "
            f"{(self.first_rss - small_rss) / MB:+.1f} MB. restic: its first backup of the "
            "same volume."
        )


def wire_bytes(pool: ChunkPool, prev: VolumeManifest, new: VolumeManifest) -> int:
    """Bytes replication would put on the wire: the encodings chosen for a receiver that
    holds ``prev`` (storage.transfer), for every chunk the manifest diff offers."""
    held = prev.chunk_ids()
    at_offset = previous_at_same_offset(new, prev)
    return sum(
        len(encode_for_receiver(pool, d, held.__contains__, at_offset.get(d)))
        for d in chunks_to_offer(new, prev)
    )


def _seconds(p: PeerBackup) -> float:
    return p.seconds


def _growth(p: PeerBackup) -> float:
    return p.repo_growth


def _added(p: PeerBackup) -> float:
    return p.data_added


NOTES = (
    f"Section 2, volume: best of {RECAPTURE_ROUNDS} alternating rounds each; tandem reads, "
    "hashes and compares every 4 MiB chunk with the base, cat reads into /dev/null. tandem "
    "uses every core and cat one, so other work on the machine (load average above) lowers "
    "this ratio.",
    "Section 3: tandem 'newly stored' is CaptureStats.bytes_stored of the capture with the "
    "previous image as base (bytes written to the pool); its replication delta is the bytes "
    "of the encodings replication sends to a receiver holding the previous image "
    "(storage.transfer: stored or computed deltas XORed with the old blocks, else whole "
    "chunks, compressed). restic: backup --json "
    "data_added (plaintext, before compression; its repo growth is in the --json file). "
    "rsync: --stats 'Literal data' of a local --no-whole-file sync onto the previous copy "
    "(block size ≈ √size).",
    "Section 4: tandem's time includes its final fsync; rsync --inplace does not fsync. Both "
    "results are checked against the image (BLAKE3 of the whole file).",
)


def run(cfg: Config, report: Report) -> None:
    report.notes.extend(NOTES)
    bench = StorageBench(cfg, report)
    try:
        bench.run()
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(bench.root)
