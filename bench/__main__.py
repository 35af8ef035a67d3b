"""``python -m bench``: run the benchmark sections and print the table.

Flags: ``--section NAME`` (repeatable; default all), ``--size-gib`` (volume size; default
2 for storage, 1 for replication; presentation always uses 1, 4 and 10 GiB, treepresentation
1 and 16 GiB trees; failback 1, 4 and 16 GiB unless given one size), ``--files`` (small files
in the tree), ``--workdir`` (a fresh directory is made inside it and removed afterwards;
default under /var/tmp), ``--json FILE`` (also save the results), ``--quick`` (small sizes,
for a short run; postgresql: a 0.35 GB cluster and five minutes of WAL instead of 1 GB and
an hour),
``--profile DIR`` (py-spy records of the daemons in the e2e, consistency and failback sections).
treefailover always uses 1 and 4 GiB trees.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    Config,
    GiB,
    MiB,
    Report,
    load_average,
    log,
    machine_info,
    make_console,
    render,
)
from bench.common import write_json as save_json

Section = Callable[[Config, Report], None]

SECTIONS = (
    "storage",
    "replication",
    "presentation",
    "treepresentation",
    "treefailover",
    "failback",
    "scale",
    "nbd",
    "consistency",
    "e2e",
    "vm",
    "vmnew",
    "postgresql",
)
"""Each is the module ``bench.NAME`` with ``run(cfg, report)``, imported only when run (they
import tandem; keep --help fast)."""


def run_section(name: str, cfg: Config, report: Report) -> None:
    section: Section = importlib.import_module(f"bench.{name}").run
    section(cfg, report)


DEFAULT_SIZE_GIB = {"storage": 2.0, "replication": 1.0, "failback": 0.0, "e2e": 2.0}
QUICK_SIZE_GIB = 0.25
QUICK_FILES = 5_000
"""The volume size of a section when --size-gib is not given (presentation has its own;
failback's 0 means its three sizes, 1, 4 and 16 GiB)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--section",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable; default: all)",
    )
    parser.add_argument(
        "--size-gib",
        type=float,
        help="volume size (default 2 for storage, 1 for replication)",
    )
    parser.add_argument(
        "--files", type=int, help="small files in the tree (default 50,000; --quick 5,000)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: volumes of {QUICK_SIZE_GIB:g} GiB and {QUICK_FILES:,} files unless "
        "--size-gib/--files say otherwise; postgresql: a small cluster and 5 minutes of WAL "
        "(default: ~1 GB and an hour)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the daemons with py-spy (e2e, consistency, failback), profiles kept in DIR",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="where to make the run's scratch directory (default /var/tmp; removed after)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also save results as JSON")
    parser.add_argument("--seed", type=int, default=1, help="data generator seed (default 1)")
    args = parser.parse_args(argv)
    if args.size_gib is not None and args.size_gib * GiB < 16 * MiB:
        parser.error("--size-gib must be at least 16 MiB (0.016)")
    if args.files is None:
        args.files = QUICK_FILES if args.quick else 50_000
    if args.files < 1:
        parser.error("--files must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tandem-bench-", dir=args.workdir))
    sections = args.section or list(SECTIONS)

    def size_gib(section: str) -> float:
        if args.size_gib:
            return float(args.size_gib)
        if args.quick:
            return QUICK_SIZE_GIB
        return DEFAULT_SIZE_GIB.get(section, 2.0)

    cfg = Config(
        size=0,
        files=args.files,
        workdir=workdir,
        seed=args.seed,
        quick=args.quick,
        profile=args.profile.absolute() if args.profile else None,
    )
    report = Report(
        machine=machine_info(),
        config={
            "sections": ",".join(sections),
            "size_gib": args.size_gib
            or (QUICK_SIZE_GIB if args.quick else None)
            or ", ".join(f"{n} {DEFAULT_SIZE_GIB[n]:g}" for n in sections if n in DEFAULT_SIZE_GIB)
            or "—",
            "files": args.files,
            "seed": args.seed,
            "quick": args.quick,
            "workdir": str(workdir),
        },
    )
    t0 = time.monotonic()
    try:
        for name in sections:
            log(f"section {name}, scratch in {workdir}")
            size = int(size_gib(name) * GiB) // MiB * MiB
            run_section(name, dataclasses.replace(cfg, size=size), report)
    except KeyboardInterrupt:
        log("interrupted; results so far follow")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        report.seconds = time.monotonic() - t0
        report.machine["load_end"] = load_average()
    render(report, make_console())
    if args.json:
        save_json(report, args.json)
        log(f"results saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
