from __future__ import annotations

import re

import pytest

from tandem.domain.ids import is_id, new_app_id, new_id, new_image_id, new_job_id, validate_name
from tandem.domain.images import FAILBACK_CLEANUP_KINDS, WRITABLE_KINDS, ImageKind
from tandem.domain.jobs import (
    ACTIVE,
    JOB_TRANSITIONS,
    TERMINAL,
    JobStatus,
    check_job_transition,
)
from tandem.errors import Conflict, InvalidInput


def test_ids_are_prefixed_base32() -> None:
    for make, prefix in ((new_image_id, "img"), (new_job_id, "job"), (new_app_id, "app")):
        value = make()
        assert re.fullmatch(prefix + r"_[a-z2-7]{12}", value), value
        assert is_id(value, prefix)
        assert not is_id(value, "zzz")
    assert len({new_id("x") for _ in range(1000)}) == 1000
    assert not is_id("img_ABC")


@pytest.mark.parametrize("name", ["a", "db1", "web-01.prod_x", "0", "A" * 64])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "_x", "a b", "a/b", "é", "A" * 65, "x\n"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="is not a valid name") as info:
        validate_name(name, "application name")
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"Invalid input: application name {name!r}")


def test_job_status_values() -> None:
    assert [s.value for s in JobStatus] == [
        "queued",
        "running",
        "succeeded",
        "failed",
        "canceled",
    ]
    assert set(JobStatus) == TERMINAL | ACTIVE
    assert not TERMINAL & ACTIVE


def test_terminal_states_are_final() -> None:
    for status in TERMINAL:
        assert JOB_TRANSITIONS[status] == frozenset()
        for new in JobStatus:
            with pytest.raises(Conflict, match="already ended"):
                check_job_transition("job_x", status, new)


def test_job_transitions() -> None:
    q, r = JobStatus.QUEUED, JobStatus.RUNNING
    assert check_job_transition("job_x", q, r) is r
    assert check_job_transition("job_x", q, JobStatus.CANCELED) is JobStatus.CANCELED
    assert check_job_transition("job_x", r, q) is q  # re-queued after an interruption
    for end in TERMINAL:
        assert check_job_transition("job_x", r, end) is end
    with pytest.raises(Conflict, match="job job_x is queued; it cannot become succeeded"):
        check_job_transition("job_x", q, JobStatus.SUCCEEDED)


def test_image_kinds() -> None:
    assert [k.value for k in ImageKind] == [
        "snapshot",
        "replica",
        "test-failover",
        "failover",
        "syncback",
        "mount",
        "protective",
    ]
    assert ImageKind.SNAPSHOT not in WRITABLE_KINDS
    assert ImageKind.REPLICA not in FAILBACK_CLEANUP_KINDS
