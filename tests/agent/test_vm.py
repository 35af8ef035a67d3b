"""A hypervisor host's agent, and one without libvirt: it starts, serves everything else
and says why it lists no domains."""

from __future__ import annotations

import sys

import pytest

from tests.agent.conftest import Agent


def test_an_agent_without_libvirt_is_not_a_hypervisor(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", None)  # `import libvirt` fails, as without it
    info = agent.client.get("/api/v1/info", headers=agent.auth).json()
    assert info["name"] == "h1" and info["hypervisor"] is False
    assert "libvirt-python is not installed" in info["reason"]
    answer = agent.client.get("/api/v1/vms", headers=agent.auth)
    assert answer.status_code == 422
    assert answer.json()["error"] == "NotHypervisor"
    assert "not a hypervisor" in answer.json()["message"]


def test_a_hypervisor_agent_lists_its_domains(agent: Agent, libvirt_host: None) -> None:
    info = agent.client.get("/api/v1/info", headers=agent.auth).json()
    assert info["hypervisor"] is True and info["libvirt"] >= 9_000_000
    domains = agent.client.get("/api/v1/vms", headers=agent.auth).json()["domains"]
    assert all({"name", "uuid", "state", "disks"} <= set(d) for d in domains)
    gone = agent.client.post(
        "/api/v1/vms/remove", headers=agent.auth, json={"name": "no-such-domain"}
    )
    assert gone.json() == {"removed": False}
    bad = agent.client.post("/api/v1/vms/remove", headers=agent.auth, json={"name": "../x"})
    assert bad.status_code == 422
