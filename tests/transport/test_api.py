"""The wire contract (transport/api.py): the JSON fields CLI.md promises operators, and
the contract's independence from the daemon's inside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import BaseModel

from tandem import errors
from tandem.transport import api

# CLI.md: "a job has at least id, type, app, status, message, bytes_total, bytes_sent,
# started, finished"; an image "at least id, kind, app, created, label"; `tandem apps`
# lists "at least name, kind, host, state, template"; each image's JSON has consistency.
DOCUMENTED = {
    api.JobOut: {"id", "type", "app", "status", "message", "bytes_total", "bytes_sent"}
    | {"started", "finished"},
    api.ImageOut: {"id", "kind", "app", "created", "label", "consistency", "nbd_uri"},
    api.AppOut: {"name", "kind", "host", "state", "template"},
}


@pytest.mark.parametrize("model", DOCUMENTED, ids=lambda m: m.__name__)
def test_the_documented_operator_fields_stay(model: type[BaseModel]) -> None:
    schema = model.model_json_schema(mode="serialization")
    missing = DOCUMENTED[model] - set(schema["properties"])
    assert not missing, f"{model.__name__} lost the documented field(s) {sorted(missing)}"


def test_a_job_document_reads_the_json_the_api_answers() -> None:
    doc = {
        "id": "job_aaaaaaaaaaaa",
        "type": "capture",
        "app": "web",
        "status": "succeeded",
        "message": "copied nbd://h:1/exp.s3cr3t",
        "image": None,
        "bytes_total": 10,
        "bytes_done": 10,
        "bytes_sent": 4,
        "created": "2026-01-01T00:00:00Z",
        "started": None,
        "finished": None,
        "actor": "admin",
        "cancel_requested": False,
        "result": {"nbd_uri": None},
    }
    job = api.JobAnswer.model_validate({"job": doc}).job
    assert job.status.value == "succeeded" and job.bytes_sent == 4
    assert api.JobOut.model_validate_json(job.model_dump_json()) == job


def test_the_contract_imports_nothing_of_the_daemons() -> None:
    """Clients import the contract; it must not pull in the catalog, jobs, operations or
    the appliance (test_layers forbids catalog; this names the file the rule is for)."""
    tree = ast.parse(Path(api.__file__).read_text())
    names = [
        n.module or ""
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tandem.")
    ]
    inside = ("tandem.catalog", "tandem.jobs", "tandem.operations", "tandem.appliance")
    assert not [n for n in names if n.startswith(inside)], names


@pytest.mark.parametrize("model", [api.RestoreIn, api.PresentIn, api.FailoverIn])
def test_an_image_named_in_a_body_has_the_shape_of_an_image_id(model: type[BaseModel]) -> None:
    """A body names an image by id (domain/ids.py): anything else is refused, naming the
    field, before it reaches an operation (the CLI says "no such image" before sending)."""
    fields = {"host": "h1"} if model is not api.RestoreIn else {}
    assert model.model_validate({**fields, "image": "img_k3v7q2m5a4bx"})
    for bad in ("../apps/x", "img_K3V7", "web"):
        with pytest.raises(errors.InvalidInput, match="image"):
            api.checked(model, **fields, image=bad)
