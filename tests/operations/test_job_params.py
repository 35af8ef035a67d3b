"""Typed job parameters (operations.jobparams, operations.registry): what a submit function
stores, the run function reads back; rows stored by earlier versions still load; a row that
does not validate fails its job with a message, and nothing is changed."""

from __future__ import annotations

import time

import pytest

from tandem.catalog import queries as q
from tandem.domain.jobs import TERMINAL, JobStatus
from tandem.errors import JobParamsInvalid
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobInfo
from tandem.operations import failover, monitor, mount, replica_failback, restore
from tandem.operations.jobparams import JobParams
from tandem.operations.registry import BY_NAME, REGISTRY
from tests.appliance.conftest import Booted, seed_app


def info(params: dict[str, object], type: str = "mount") -> JobInfo:
    return JobInfo(id="job_aaaaaaaaaaaa", type=type, app="web", image=None, params=params)


@pytest.mark.parametrize(
    ("model", "stored"),
    [
        # As the versions before typed parameters stored them (None values included).
        (
            mount.Params,
            {"host": "h1", "mount_point": None, "action": "map-only", "recover": True,
             "time": None, "port": None, "new_vm": "t1", "network": None, "power_on": False,
             "keep_identity": False, "pool": None, "copy_disks": False},
        ),
        (
            failover.Params,
            {"host": "h2", "mount_point": None, "action": "map-only", "label": None,
             "time": "2026-01-01T00:00:00+00:00", "port": 5433, "verify": True,
             "vm_hosts": ["h3"], "new_vm": "web", "network": "default", "power_on": True,
             "keep_identity": True, "pool": "default", "copy_disks": False,
             "existing_vm": True, "shutdown_timeout": 30.0},
        ),
        (restore.Params, {"commands": False, "rollforward": True, "time": None}),
        (replica_failback.Params, {"target": "new", "host": "h1", "path": "/srv/x",
                                   "power_on": True, "shutdown_timeout": 5, "pool": "p"}),
        (replica_failback.EndParams, {}),
    ],
)  # fmt: skip
def test_rows_stored_before_load_and_store_again_the_same(
    model: type[JobParams], stored: dict[str, object]
) -> None:
    params = model.of(info(stored))
    again = model.model_validate(params.stored())
    assert again == params
    for key, value in stored.items():
        assert getattr(params, key) == value, key


def test_a_row_that_does_not_validate_names_the_job_and_the_keys() -> None:
    with pytest.raises(JobParamsInvalid) as raised:
        mount.Params.of(info({"host": "h1", "action": "map-only", "mountpoint": "/x"}))
    assert "job_aaaaaaaaaaaa (mount)" in raised.value.message
    assert "mountpoint: Extra inputs are not permitted" in raised.value.message
    with pytest.raises(JobParamsInvalid, match="target: Input should be 'original'"):
        replica_failback.Params.of(info({"target": "elsewhere"}, "failback-replica"))


def test_every_registered_job_type_is_unique_and_validates_its_defaults() -> None:
    assert len({spec.job_type for spec in REGISTRY}) == len(REGISTRY)
    assert len({spec.name for spec in REGISTRY}) == len(REGISTRY)
    for spec in REGISTRY:
        assert spec.params.model_config.get("extra") == "forbid", spec.name


def test_a_stored_row_that_fails_validation_fails_its_job_cleanly(booted: Booted) -> None:
    appliance = booted.appliance
    seed_app(appliance)
    with appliance.catalog.begin() as session:
        job = submit_job(
            session,
            type=BY_NAME["capture"].job_type,
            app="web",
            params={"label": 7, "bogus": True},  # as a damaged or foreign row would hold
            lifecycle=True,
        )
    appliance.runner.start()
    deadline = time.monotonic() + 120
    ended = monitor.get_job(appliance.site, job_id=job.id)
    while ended.status not in TERMINAL and time.monotonic() < deadline:
        ended = monitor.get_job(appliance.site, job_id=job.id, wait=monitor.MAX_WAIT)
    assert ended.status is JobStatus.FAILED
    assert ended.message is not None
    assert f"Job {job.id} (capture) cannot run: its stored parameters are not valid" in (
        ended.message
    )
    assert "label: Input should be a valid string" in ended.message
    assert "bogus: Extra inputs are not permitted" in ended.message
    assert "internal error" not in ended.message
    with appliance.catalog.read() as session:
        assert q.list_images(session, app="web") == []  # nothing was captured
        assert q.get_app(session, name="web").state.value == "managed"
