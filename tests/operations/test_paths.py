"""Host paths through the operations (every entry point: API, console, CLI): canonical only,
apps on one host never overlap, and a restore never follows a symlink swapped in for the
app's folder. A live appliance and agent (``tests.operations.conftest``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.domain.paths import CanonicalPath, check_path, overlaps
from tandem.domain.rules import RESTORE_CONFIRMATIONS
from tandem.errors import Conflict, InvalidInput
from tandem.operations import apps, capture, clone, mount, restore, templates
from tandem.transport.api import CloneIn, MountIn
from tests.operations.conftest import Live

NOT_CANONICAL = [
    ("/.", "is the root folder /"),
    ("//", "is the root folder /"),
    ("/", "is the root folder /"),
    ("/etc/..", "is the root folder /"),
    ("A/../A", "is not an absolute path"),
    ("srv/app", "is not an absolute path"),
    ("", "is not an absolute path"),
    ("/srv//app", "write it as '/srv/app'"),
    ("//srv/app", "write it as '/srv/app'"),
    ("/srv/app/", "write it as '/srv/app'"),
    ("/srv/./app", "write it as '/srv/app'"),
    ("/srv/x/../app", "write it as '/srv/app'"),
    ("/srv/app/.", "write it as '/srv/app'"),
    ("/srv/a\x00pp", "holds a NUL byte"),
    ("/" + "a" * 5000, "is longer than 4096 bytes"),
]


def test_the_path_rule(tmp_path: Path) -> None:
    for path, why in NOT_CANONICAL:
        with pytest.raises(InvalidInput, match="--path .*" + why.replace("(", r"\(")):
            check_path(path)
    assert check_path("/srv/app") == "/srv/app"
    assert check_path("/srv/my app/é") == "/srv/my app/é"
    assert overlaps("/srv/a", "/srv/a") and overlaps("/srv", "/srv/a/b")
    assert overlaps("/srv/a/b", "/srv/a") and not overlaps("/srv/a", "/srv/ab")

    from pydantic import BaseModel, ValidationError

    class Model(BaseModel):
        path: CanonicalPath

    assert Model(path="/srv/app").path == "/srv/app"
    with pytest.raises(ValidationError, match="write it as '/srv/app'"):
        Model(path="/srv//app")


@pytest.mark.parametrize("path,why", NOT_CANONICAL, ids=[repr(p[:20]) for p, _ in NOT_CANONICAL])
def test_app_add_refuses_a_path_that_is_not_canonical(live: Live, path: str, why: str) -> None:
    site = live.appliance.site
    with pytest.raises(InvalidInput, match=why.replace("(", r"\(")):
        apps.add_app(site, name="a", host="h1", kind=AppKind.FILESYSTEM, path=path)
    assert apps.list_apps(site) == []


def test_apps_on_one_host_never_overlap(live: Live) -> None:
    site = live.appliance.site
    apps.add_app(site, name="data", host="h1", kind=AppKind.FILESYSTEM, path="/srv/data")
    for path, how in [
        ("/srv/data", "is the path of"),
        ("/srv/data/db", "lies inside the path of"),
        ("/srv", "contains the path of"),
    ]:
        with pytest.raises(Conflict, match=f"{how} application 'data' \\(/srv/data\\)"):
            apps.add_app(site, name="other", host="h1", kind=AppKind.FILESYSTEM, path=path)
    apps.add_app(site, name="data2", host="h1", kind=AppKind.FILESYSTEM, path="/srv/data2")
    assert [a.name for a in apps.list_apps(site)] == ["data", "data2"]


def test_mirror_records_of_the_peer_do_not_count(live: Live) -> None:
    """A DR site holds the production site's apps with its host names; they are not apps on
    this site's hosts (even when a host here has the same name)."""
    site = live.appliance.site
    with site.catalog.begin() as session:
        q.add_app(
            session, name="mirrored", kind=AppKind.FILESYSTEM, host="h1", path="/srv", origin="prod"
        )
    apps.add_app(site, name="local", host="h1", kind=AppKind.FILESYSTEM, path="/srv/local")
    assert {a.name for a in apps.list_apps(site)} == {"mirrored", "local"}


def protected(live: Live, name: str, path: Path) -> str:
    """Add and protect a tree app at ``path`` and capture it; returns the image id."""
    site = live.appliance.site
    apps.add_app(site, name=name, host="h1", kind=AppKind.FILESYSTEM, path=str(path))
    if "manual" not in {t.name for t in templates.list_templates(site)}:
        templates.add_template(site, name="manual", every=None, keep=None, mirror=False)
    apps.protect_app(site, name=name, template="manual", actor="t")
    job = live.appliance.runner.wait(capture.submit_capture(site, app=name, actor="t").id, 60)
    assert job.status is JobStatus.SUCCEEDED and job.image is not None, job.message
    return job.image


def test_clone_and_mount_paths_are_canonical_and_clones_do_not_overlap(
    live: Live, tmp_path: Path
) -> None:
    site = live.appliance.site
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    image = protected(live, "web", data)
    with pytest.raises(InvalidInput, match=f"write it as '{tmp_path}/copy'"):
        clone.submit(site, image, CloneIn(host="h1", path=f"{tmp_path}//copy"))
    with pytest.raises(Conflict, match="lies inside the path of application 'web'"):
        clone.submit(site, image, CloneIn(host="h1", path=f"{data}/nested-copy"))
    with pytest.raises(InvalidInput, match=r"--mount-point .*write it as '/mnt/x'"):
        mount.submit(site, image, MountIn(host="h1", mount_point="/mnt/x/"))
    with pytest.raises(InvalidInput, match=r"--mount-point .*is the root folder"):
        mount.submit(site, image, MountIn(host="h1", mount_point="/mnt/.."))
    assert not (data / "nested-copy").exists()
    assert [j.type for j in _jobs(live)] == ["capture"]


def _jobs(live: Live) -> list[Job]:
    with live.appliance.catalog.read() as session:
        return list(q.list_jobs(session, limit=50))


def victim_folder(path: Path) -> list[tuple[str, bytes | None]]:
    """Make a folder of someone else's files; returns what it holds (to compare later)."""
    (path / "sub").mkdir(parents=True)
    (path / "precious.txt").write_text("keep me\n")
    (path / "sub" / "more.bin").write_bytes(os.urandom(3000))
    return held(path)


def held(path: Path) -> list[tuple[str, bytes | None]]:
    return [
        (str(p.relative_to(path)), None if p.is_dir() else p.read_bytes())
        for p in sorted(path.rglob("*"))
    ]


def failed_restore(live: Live, app: str, image: str) -> str:
    job = restore.submit_restore(
        live.appliance.site, app=app, image=image, confirm=list(RESTORE_CONFIRMATIONS), actor="t"
    )
    done = live.appliance.runner.wait(job.id, 60)
    assert done.status is JobStatus.FAILED, done.message
    return done.message or ""


def test_a_restore_refuses_a_root_swapped_for_a_symlink(live: Live, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "app.conf").write_text("mine\n")
    image = protected(live, "web", data)
    victim = tmp_path / "victim"
    before = victim_folder(victim)

    data.rename(tmp_path / "moved-away")
    data.symlink_to(victim)  # whoever can write in tmp_path swaps the app's folder
    message = failed_restore(live, "web", image)
    assert f"a component of the path is a symbolic link ({data})" in message
    assert held(victim) == before


def test_a_restore_refuses_a_symlink_higher_up_the_path(live: Live, tmp_path: Path) -> None:
    data = tmp_path / "srv" / "app"
    data.mkdir(parents=True)
    (data / "app.conf").write_text("mine\n")
    image = protected(live, "deep", data)
    elsewhere = tmp_path / "elsewhere"
    before = victim_folder(elsewhere / "app")

    (tmp_path / "srv").rename(tmp_path / "srv-old")
    (tmp_path / "srv").symlink_to(elsewhere)
    message = failed_restore(live, "deep", image)
    assert f"a component of the path is a symbolic link ({tmp_path / 'srv'})" in message
    assert held(elsewhere / "app") == before
