"""schemathesis against the published OpenAPI: no input, however odd, gets a 5xx.

Every operation is fuzzed with an admin token (so requests get past authentication into
the routes), with valid and with invalid data, against a real appliance served over HTTPS
in-process. schemathesis' own pytest plugin does not run under pytest 9, so the operations
are driven through hypothesis here.

Then every operation is called with a viewer, an operator and a peer token, on real
resources (an app, a presented image, the job that presented it): no call gets a 2xx
answer unless ``auth.needed_role`` lets that role make it, and no viewer's 2xx answer
holds a secret (an NBD export's, a host's agent token, an API token).

Left out: ``POST /api/v1/hosts`` and ``POST /api/v1/peers`` contact the agent or appliance
at the URL they are given, so their answer to an address where none runs is ``502
Unreachable`` by design (a bad gateway, not a crash), and fuzzing them would mean connecting
to arbitrary addresses.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed (test extra)"
)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tandem.appliance.auth import needed_role  # noqa: E402
from tandem.catalog import queries as q  # noqa: E402
from tandem.domain.rules import Role, role_allows  # noqa: E402
from tandem.operations import peers, tokens  # noqa: E402
from tests.appliance.conftest import Api  # noqa: E402
from tests.appliance.test_capabilities import SECRET, present  # noqa: E402

EXAMPLES = 8
ROLE_EXAMPLES = 3
LEFT_OUT = {("POST", "/api/v1/hosts"), ("POST", "/api/v1/peers")}
HOST_SECRET = "agent-token-Hq8vN3xK5pL0wR7t"


def test_no_server_errors(api: Api) -> None:
    schema = schemathesis.openapi.from_dict(api.appliance.app.openapi())
    cert = str(api.appliance.directory / "cert.pem")
    failures: list[str] = []
    fuzzed = 0
    calls = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation, mode in itertools.product(operations, GenerationMode):
        if (operation.method.upper(), operation.path) in LEFT_OUT:
            continue
        fuzzed += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case: Any) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(
                base_url=api.appliance.site.url,
                headers=api.headers(),
                verify=cert,
                checks=[not_a_server_error],
                timeout=30,
            )

        try:
            fuzz()
        except Unsatisfiable:
            continue  # nothing invalid can be sent to this operation (no parameters)
        except Exception as exc:  # collect every operation's failure, not just the first
            failures.append(f"{mode.value} {operation.method.upper()} {operation.path}: {exc}")
    assert fuzzed >= 50 and calls >= 6 * fuzzed
    assert not failures, "\n\n".join(failures)


def test_no_call_gets_past_its_role(api: Api, tmp_path: Path) -> None:
    shown = present(api, tmp_path)
    with api.appliance.catalog.begin() as session:
        q.add_host(
            session, name="h2", url="https://127.0.0.1:1", token=HOST_SECRET, fingerprint="11" * 32
        )
        # the paired site's own token: its peer calls are allowed, nothing else is
        q.add_peer(session, name="dr", url="https://127.0.0.1:1", token="t", fingerprint="22" * 32)
    _, api.tokens["peer"] = tokens.add_token(
        api.appliance.site, name=peers.peer_token_name("dr"), role=Role.PEER
    )
    secrets = [SECRET, HOST_SECRET, *api.tokens.values()]
    real = {"name": "web", "image_id": shown.image, "job_id": shown.job}
    schema = schemathesis.openapi.from_dict(api.appliance.app.openapi())
    cert = str(api.appliance.directory / "cert.pem")
    failures: list[str] = []
    calls = 0

    def fuzz_as(role: str, operation: Any) -> None:
        method = operation.method.upper()
        allowed = role_allows(Role(role), needed_role(method, operation.path))

        @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        @settings(
            max_examples=ROLE_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def call(case: Any) -> None:
            nonlocal calls
            calls += 1
            for key in case.path_parameters or {}:
                case.path_parameters[key] = real.get(key, case.path_parameters[key])
            answer = case.call(
                base_url=api.appliance.site.url, headers=api.headers(role), verify=cert, timeout=30
            )
            where = f"{method} {case.formatted_path}"
            if 200 <= answer.status_code < 300:
                if not allowed:
                    failures.append(f"{role} got {answer.status_code} for {where}")
                if role == "viewer" and any(secret in answer.text for secret in secrets):
                    failures.append(f"viewer read a secret in {where}")

        with contextlib.suppress(Unsatisfiable):
            call()

    operations = [result.ok() for result in schema.get_all_operations()]
    # viewer first: the operator's calls change things (delete images, start jobs)
    for role, operation in itertools.product(("viewer", "peer", "operator"), operations):
        if (operation.method.upper(), operation.path) in LEFT_OUT:
            continue
        if operation.path.startswith(("/api/", "/metrics")):
            fuzz_as(role, operation)
    assert calls >= 3 * 50
    assert not failures, "\n".join(sorted(set(failures)))
