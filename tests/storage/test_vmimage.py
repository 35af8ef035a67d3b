"""VM images: several disks in one volume manifest, each at a 4 MiB boundary; a capture
with a disk's changed extents reads only those and makes the image a full read would."""

from __future__ import annotations

import random

import pytest

from tandem.errors import InvalidInput
from tandem.storage import vmimage
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest
from tandem.storage.overlay import ImageReader
from tandem.storage.pool import ChunkPool

MiB = 1024 * 1024
KiB = 1024


class Disk:
    """A disk's bytes at the instant of the cut (what the backup export serves)."""

    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.read_bytes = 0

    def read(self, offset: int, length: int) -> bytes:
        self.read_bytes += length
        return bytes(self.data[offset : offset + length])


def sources(
    disks: dict[str, Disk], dirty: dict[str, list[tuple[int, int]]] | None = None
) -> list[vmimage.DiskSource]:
    slots = vmimage.layout([(t, len(d.data), "qcow2", f"/{t}") for t, d in disks.items()])
    return [
        vmimage.DiskSource(
            slot,
            disks[slot.target],
            [(0, slot.size)],
            None if dirty is None else dirty.get(slot.target, []),
        )
        for slot in slots
    ]


def test_disks_lie_end_to_end_at_chunk_boundaries(pool: ChunkPool) -> None:
    rng = random.Random(3)
    vda = Disk(bytearray(rng.randbytes(5 * MiB + 512)))
    vdb = Disk(bytearray(rng.randbytes(3 * MiB)))
    _, manifest, _ = vmimage.capture_disks(
        pool, sources({"vda": vda, "vdb": vdb}), meta={"vm": {"disks": []}}
    )
    slots = vmimage.layout([("vda", 5 * MiB + 512, "qcow2", ""), ("vdb", 3 * MiB, "raw", "")])
    assert [s.offset for s in slots] == [0, 2 * VOLUME_CHUNK]
    assert manifest.size == 2 * VOLUME_CHUNK + 3 * MiB
    image = ImageReader(pool, manifest)
    assert image.read(0, len(vda.data)) == bytes(vda.data)
    assert image.read(len(vda.data), 2 * VOLUME_CHUNK - len(vda.data)) == bytes(
        2 * VOLUME_CHUNK - len(vda.data)
    )
    assert image.read(2 * VOLUME_CHUNK, 3 * MiB) == bytes(vdb.data)


def test_changed_extents_alone_are_read(pool: ChunkPool) -> None:
    rng = random.Random(5)
    vda = Disk(bytearray(rng.randbytes(12 * MiB)))
    vdb = Disk(bytearray(8 * MiB))  # all zeros so far
    meta = {
        "vm": {"disks": [s.as_dict() for s in (x.slot for x in sources({"vda": vda, "vdb": vdb}))]}
    }
    base_id, base, _ = vmimage.capture_disks(pool, sources({"vda": vda, "vdb": vdb}), meta=meta)

    vda.data[5 * MiB : 5 * MiB + 128 * KiB] = rng.randbytes(128 * KiB)
    vdb.data[1 * MiB : 1 * MiB + 64 * KiB] = rng.randbytes(64 * KiB)
    vda.read_bytes = vdb.read_bytes = 0
    dirty = {"vda": [(5 * MiB, 128 * KiB)], "vdb": [(1 * MiB, 64 * KiB)]}
    mid, manifest, stats = vmimage.capture_disks(
        pool, sources({"vda": vda, "vdb": vdb}, dirty), base=base, base_id=base_id, meta=meta
    )
    assert vda.read_bytes == 128 * KiB and vdb.read_bytes == 64 * KiB
    assert stats.bytes_read == 192 * KiB

    # The same image a full read makes.
    full_id, _, _ = vmimage.capture_disks(pool, sources({"vda": vda, "vdb": vdb}), meta=meta)
    assert full_id == mid
    assert vmimage.slots_of(manifest) == [x.slot for x in sources({"vda": vda, "vdb": vdb})]


class Target(Disk):
    """A disk being restored (``vmimage.DiskTarget``), counting what is written."""

    def __init__(self, data: bytearray) -> None:
        super().__init__(data)
        self.written = 0

    def write(self, offset: int, data: bytes) -> None:
        assert offset + len(data) <= len(self.data)  # never past the disk's end
        self.data[offset : offset + len(data)] = data
        self.written += len(data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))


def vm_image(pool: ChunkPool, disks: dict[str, Disk]) -> VolumeManifest:
    found = sources(disks)
    meta = {"vm": {"disks": [d.slot.as_dict() for d in found]}}
    return vmimage.capture_disks(pool, found, meta=meta)[1]


def test_restore_writes_only_the_blocks_that_differ_on_each_disk(pool: ChunkPool) -> None:
    rng = random.Random(5)
    vda = bytearray(rng.randbytes(5 * MiB + 512))  # a short tail chunk
    vdb = bytearray(rng.randbytes(4 * MiB)) + bytearray(4 * MiB)  # a chunk of zeros
    manifest = vm_image(pool, {"vda": Disk(vda), "vdb": Disk(vdb)})
    # The disks since: 2 blocks of vda rewritten (one in the tail), vdb's zeros written.
    now_a, now_b = bytearray(vda), bytearray(vdb)
    now_a[100 * KiB : 110 * KiB] = b"x" * 10 * KiB
    now_a[5 * MiB + 100 : 5 * MiB + 200] = b"y" * 100
    now_b[6 * MiB : 6 * MiB + 1000] = b"z" * 1000
    a, b = Target(now_a), Target(now_b)
    stats = vmimage.restore_disks(pool, manifest, {"vda": a, "vdb": b})
    assert bytes(a.data) == bytes(vda) and bytes(b.data) == bytes(vdb)
    assert a.written == 64 * KiB + 512  # a whole block, and the tail block up to the end
    assert b.written == 64 * KiB  # the zero chunk's block that was written is zeroed
    assert stats.bytes_written == a.written + b.written
    assert stats.bytes_compared == len(vda) + len(vdb)
    # Restored again: nothing differs, nothing is written.
    again = vmimage.restore_disks(pool, manifest, {"vda": Target(a.data), "vdb": Target(b.data)})
    assert again.bytes_written == 0


def test_a_restore_target_must_have_every_disk_at_its_size(pool: ChunkPool) -> None:
    manifest = vm_image(pool, {"vda": Disk(bytearray(2 * MiB))})
    assert [s.target for s in vmimage.check_targets(manifest, {"vda": 2 * MiB})] == ["vda"]
    for sizes, said in (({"vdb": 2 * MiB}, "no disk vda"), ({"vda": MiB}, "qemu-img resize")):
        with pytest.raises(InvalidInput, match=said):
            vmimage.check_targets(manifest, sizes)
