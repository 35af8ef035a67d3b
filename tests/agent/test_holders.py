"""The "is the application still running?" check: processes holding its data are found."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tandem.agent.holders import holders


def wait_for_holder(path: Path, pid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [h.pid for h in holders(path)]
        if pid in pids:
            return pids
        time.sleep(0.05)
    return [h.pid for h in holders(path)]


def test_open_file_cwd_and_mapping_are_seen_and_released(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "data").mkdir(parents=True)
    db = app / "data" / "db.bin"
    db.write_bytes(b"x" * 8192)
    other = tmp_path / "other"
    other.mkdir()
    assert holders(app) == []
    programs = {
        "open file": f"f = open({str(db)!r}, 'rb')",
        "working directory": f"import os; os.chdir({str(app)!r})",
        "mapping": f"import mmap; f = open({str(db)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, "
        "access=mmap.ACCESS_READ); f.close()",
    }
    for what, code in programs.items():
        proc = subprocess.Popen(
            [sys.executable, "-c", f"{code}; import time; time.sleep(60)"], cwd=other
        )
        try:
            assert proc.pid in wait_for_holder(app, proc.pid), what
            held = next(h for h in holders(app) if h.pid == proc.pid)
            assert held.command.startswith("python") and str(app) in str(held)
            assert proc.pid not in [h.pid for h in holders(other / "nothing-here")]
        finally:
            proc.kill()
            proc.wait()
        assert proc.pid not in [h.pid for h in holders(app)], what


def test_the_root_path_is_never_reported_held() -> None:
    assert holders("/") == []
