"""`tandem storage …`: drive the data plane directly on a pool: a directory, or a pool on
an S3-compatible store (``s3://BUCKET[/PREFIX]?endpoint=URL``, credentials from
TANDEM_S3_ACCESS_KEY and TANDEM_S3_SECRET_KEY; the copies of its pack indexes are kept in a
temporary directory for the command's life).

Useful for operators inspecting a pool and for scripting without daemons. In a standalone
pool every stored manifest is a root: `gc` keeps what any manifest names; `forget` drops one.
On a store, `gc` is the appliance's collection by listing (``storage.gc``) with every
stored manifest as a root, so it is safe beside an appliance that uses the bucket (it keeps
more than the appliance's own `tandem gc`, which knows which images were deleted).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandem.errors import ImageKindDiffers, NotFound

from .output import byte_progress, emit_json, handle_errors, human_bytes, stdout

app = typer.Typer(no_args_is_help=True, help="Work on a chunk pool directly.")

PoolArg = Annotated[
    str, typer.Argument(help="Pool directory, or s3://BUCKET[/PREFIX]?endpoint=URL.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


if TYPE_CHECKING:
    from tandem.storage.pool import ChunkPool

# The storage engine is imported by the commands that use it (``from tandem.storage …``
# inside each): every `tandem` run builds this group to list it in help, and an API
# command must not pay for the data plane (tests/cli/test_startup.py).


class Kind(StrEnum):
    volume = "volume"
    tree = "tree"


def _open(pool: str, *, create: bool = False) -> ChunkPool:
    """The pool at ``pool``: a directory, or a store's URL (reached and checked)."""
    from tandem.storage.objstore import is_store_url
    from tandem.storage.pool import ChunkPool

    if not is_store_url(pool):
        return ChunkPool.create(Path(pool)) if create else ChunkPool(Path(pool))
    import atexit
    import shutil
    import tempfile

    from tandem.appliance.pools import store_from_env
    from tandem.storage.objstore import parse_store_url
    from tandem.storage.s3pool import S3Pool

    store = store_from_env(parse_store_url(pool))
    cache = tempfile.mkdtemp(prefix="tandem-pool-cache-")
    atexit.register(shutil.rmtree, cache, True)
    return S3Pool.create_on(store, cache) if create else S3Pool(store, cache)


def _where(pool: ChunkPool) -> str:
    return str(getattr(pool, "where", pool.root))


def _manifest_id(pool: ChunkPool, text: str) -> bytes:
    from tandem.storage.digest import from_hex

    try:
        digest = from_hex(text)
    except ValueError:
        matches = [m for m in pool.list_manifests() if m.hex().startswith(text.lower())]
        if len(matches) != 1 or len(text) < 6:
            raise NotFound(
                what="manifest", name=text, listing=f"storage list {_where(pool)}"
            ) from None
        return matches[0]
    if not pool.has_manifest(digest):
        raise NotFound(what="manifest", name=text, listing=f"storage list {_where(pool)}")
    return digest


@app.command()
@handle_errors
def init(pool: PoolArg, json_: JsonOpt = False) -> None:
    """Create a pool (no-op if it exists)."""
    p = _open(pool, create=True)
    if json_:
        emit_json({"pool": _where(p)})
    else:
        stdout.print(f"pool ready at {_where(p)}")


@app.command()
@handle_errors
def capture(
    pool: PoolArg,
    source: Annotated[Path, typer.Argument(help="File, block device or directory.")],
    kind: Annotated[Kind | None, typer.Option(help="Default: tree for a directory.")] = None,
    base: Annotated[str | None, typer.Option(help="Previous manifest of this source.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Capture SOURCE into the pool; prints the manifest id."""
    from tandem.storage import tree as tree_mod
    from tandem.storage import volume as volume_mod
    from tandem.storage.manifest import TreeManifest, VolumeManifest, load_manifest

    p = _open(pool)
    kind = kind or (Kind.tree if source.is_dir() else Kind.volume)
    base_id = _manifest_id(p, base) if base else None
    base_m = load_manifest(p, base_id) if base_id else None
    with byte_progress(f"capture {source.name}") as bar:
        task = bar.add_task(f"capture {source.name}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if kind is Kind.volume:
            if base_m is not None and not isinstance(base_m, VolumeManifest):
                raise ImageKindDiffers(
                    image=f"--base {base}",
                    have="a file-tree image",
                    how="be the base of a volume capture",
                    fix="Give --base the volume's previous manifest, or capture with --kind tree",
                )
            mid, _, stats = volume_mod.capture_volume(
                p, source, base=base_m, base_id=base_id, progress=progress
            )
        else:
            if base_m is not None and not isinstance(base_m, TreeManifest):
                raise ImageKindDiffers(
                    image=f"--base {base}",
                    have="a volume image",
                    how="be the base of a file-tree capture",
                    fix="Give --base the tree's previous manifest, or capture with --kind volume",
                )
            mid, _, stats = tree_mod.capture_tree(
                p, source, base=base_m, base_id=base_id, progress=progress
            )
    doc = {"manifest": mid.hex(), "kind": kind.value, "stats": stats.as_dict()}
    if json_:
        emit_json(doc)
    else:
        stdout.print(
            f"{mid.hex()}  {kind.value}  {human_bytes(stats.bytes_total)}"
            f" read {human_bytes(stats.bytes_read)}, stored {human_bytes(stats.bytes_stored)}"
            f" in {stats.seconds:.2f}s"
        )


@app.command()
@handle_errors
def restore(
    pool: PoolArg,
    manifest: Annotated[str, typer.Argument(help="Manifest id (or a unique prefix).")],
    target: Annotated[Path, typer.Argument(help="File, device or directory to make equal.")],
    json_: JsonOpt = False,
) -> None:
    """Diff-restore an image onto TARGET, writing only what differs."""
    from tandem.storage import tree as tree_mod
    from tandem.storage import volume as volume_mod
    from tandem.storage.manifest import VolumeManifest, load_manifest

    p = _open(pool)
    mid = _manifest_id(p, manifest)
    m = load_manifest(p, mid)
    with byte_progress(f"restore {mid.hex()[:12]}") as bar:
        task = bar.add_task(f"restore {mid.hex()[:12]}", total=m.size)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if isinstance(m, VolumeManifest):
            stats = volume_mod.restore_volume(p, m, target, progress=progress)
        else:
            stats = tree_mod.restore_tree(p, m, target, progress=progress)
    if json_:
        emit_json({"manifest": mid.hex(), "target": str(target), "stats": stats.as_dict()})
    else:
        stdout.print(
            f"restored {human_bytes(stats.bytes_total)} onto {target}:"
            f" wrote {human_bytes(stats.bytes_written)} in {stats.seconds:.2f}s"
        )


def _live(p: ChunkPool) -> dict[bytes, set[bytes]]:
    from tandem.storage.manifest import load_manifest

    return {mid: load_manifest(p, mid).chunk_ids() for mid in p.list_manifests()}


@app.command()
@handle_errors
def verify(pool: PoolArg, json_: JsonOpt = False) -> None:
    """Read and check every chunk and manifest; exit 1 if anything is bad or missing."""
    p = _open(pool)
    report = p.verify(_live(p))
    doc: dict[str, Any] = {
        "ok": report.ok,
        "chunks": report.chunks,
        "bytes": report.bytes,
        "manifests": report.manifests,
        "bad": [{"chunk": c, "reason": r} for c, r in report.bad],
        "missing": [{"manifest": m, "chunk": c} for m, c in report.missing],
    }
    if json_:
        emit_json(doc)
    else:
        stdout.print(
            f"{report.chunks} chunks ({human_bytes(report.bytes)}),"
            f" {report.manifests} manifests: {'ok' if report.ok else 'DAMAGED'}"
        )
        for c, r in report.bad:
            stdout.print(f"  bad chunk {c}: {r}")
        for m, c in report.missing:
            stdout.print(f"  manifest {m} names missing chunk {c}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@handle_errors
def gc(pool: PoolArg, json_: JsonOpt = False) -> None:
    """Remove chunks that no manifest names (safe while captures run)."""
    from tandem.storage.s3pool import S3Pool

    p = _open(pool)
    if isinstance(p, S3Pool):
        from tandem.storage import gc as pool_gc

        run = pool_gc.collect(p, p.list_manifests)
        doc: dict[str, Any] = {
            "chunks_removed": run.chunks_removed,
            "chunks_kept": run.chunks_kept,
            "bytes_freed": run.bytes_freed,
            "packs_deleted": run.packs_deleted,
            "packs_rewritten": run.packs_rewritten,
            "orphan_packs_deleted": run.orphans_deleted,
        }
    else:
        doc = p.gc(_live(p), remove_manifests=False).__dict__
    if json_:
        emit_json(doc)
    else:
        stdout.print(
            f"removed {doc['chunks_removed']} chunks ({human_bytes(doc['bytes_freed'])}),"
            f" kept {doc['chunks_kept']}"
            + (
                f"; {doc['packs_deleted']} pack(s) deleted, {doc['packs_rewritten']} rewritten"
                if "packs_deleted" in doc
                else ""
            )
        )


@app.command()
@handle_errors
def stats(pool: PoolArg, json_: JsonOpt = False) -> None:
    """Count the chunks, packs and manifests of the pool (from its indexes; nothing read)."""
    p = _open(pool)
    chunks = stored = 0
    for _, st in p.iter_chunks():
        chunks += 1
        stored += st.st_size
    doc = {
        "pool": _where(p),
        "chunks": chunks,
        "stored_bytes": stored,
        "packs": len(p.packs.packs()),
        "manifests": len(p.list_manifests()),
    }
    if json_:
        emit_json(doc)
    else:
        stdout.print(
            f"{doc['pool']}: {chunks} chunks ({human_bytes(stored)} stored),"
            f" {doc['packs']} pack(s), {doc['manifests']} manifests"
        )


@app.command("list")
@handle_errors
def list_(pool: PoolArg, json_: JsonOpt = False) -> None:
    """List the manifests in the pool."""
    from rich.table import Table

    from tandem.storage.manifest import load_manifest

    p = _open(pool)
    rows: list[dict[str, Any]] = []
    for mid in p.list_manifests():
        m = load_manifest(p, mid)
        rows.append({"manifest": mid.hex(), "kind": m.kind, "size": m.size, "meta": m.meta})
    if json_:
        emit_json(rows)
        return
    table = Table("manifest", "kind", "size")
    for r in rows:
        table.add_row(r["manifest"], r["kind"], human_bytes(r["size"]))
    stdout.print(table)


@app.command()
@handle_errors
def forget(
    pool: PoolArg,
    manifest: Annotated[str, typer.Argument(help="Manifest id (or a unique prefix).")],
    json_: JsonOpt = False,
) -> None:
    """Drop a manifest; its chunks go at the next gc unless another manifest names them."""
    p = _open(pool)
    mid = _manifest_id(p, manifest)
    p.delete_manifest(mid)
    if json_:
        emit_json({"forgotten": mid.hex()})
    else:
        stdout.print(f"forgot {mid.hex()}")


@app.command()
@handle_errors
def diff(
    pool: PoolArg,
    old: Annotated[str, typer.Argument(help="Older manifest.")],
    new: Annotated[str, typer.Argument(help="Newer manifest.")],
    json_: JsonOpt = False,
) -> None:
    """What changed between two images, from their manifests."""
    from tandem.storage import tree as tree_mod
    from tandem.storage import volume as volume_mod
    from tandem.storage.manifest import TreeManifest, VolumeManifest, load_manifest

    p = _open(pool)
    a, b = load_manifest(p, _manifest_id(p, old)), load_manifest(p, _manifest_id(p, new))
    if isinstance(a, VolumeManifest) and isinstance(b, VolumeManifest):
        ranges = volume_mod.diff_volumes(a, b, p)
        doc: dict[str, Any] = {
            "kind": "volume",
            "changed_bytes": sum(n for _, n in ranges),
            "ranges": [{"offset": o, "length": n} for o, n in ranges],
        }
    elif isinstance(a, TreeManifest) and isinstance(b, TreeManifest):
        d = tree_mod.diff_trees(a, b)
        doc = {
            "kind": "tree",
            "changed_bytes": d.changed_bytes,
            "added": d.added,
            "removed": d.removed,
            "changed": d.changed,
            "metadata_changed": d.metadata_changed,
        }
    else:
        raise ImageKindDiffers(
            image=old,
            have="a volume image" if isinstance(a, VolumeManifest) else "a file-tree image",
            how=f"be diffed against {new}, an image of the other kind",
            fix="Diff two images of one kind",
        )
    if json_:
        emit_json(doc)
    else:
        stdout.print(f"{doc['kind']}: {human_bytes(doc['changed_bytes'])} changed")
        for key in ("ranges", "added", "removed", "changed", "metadata_changed"):
            for item in doc.get(key, []):
                stdout.print(f"  {key}: {item}")
