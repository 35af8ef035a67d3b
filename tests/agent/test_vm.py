"""A hypervisor host's agent, and one without libvirt: it starts, serves everything else
and says why it lists no domains."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from tests import vmguest
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


BARE = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>
<source file='/nonexistent.img'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""


def define_body(name: str, source: str) -> dict[str, object]:
    """A new VM over an NBD export, as a failover or test failover asks the agent for it."""
    return {
        "name": name,
        "xml": BARE.format(name=source),
        "disks": [{"target": "vda", "offset": 0, "size": 1 << 20, "format": "raw"}],
        "nbd_uri": "nbd://127.0.0.1:10809/img-aaaaaaaaaaaa.Zk3vQ9-pW2_xR7mN4bT8yL1c",
        "source_domain": source,
        "source_uuid": "",
    }


def test_a_new_vm_is_never_the_source_domain_nor_a_name_that_exists(
    agent: Agent, libvirt_host: None, tmp_path: Path
) -> None:
    """Guards ``agent.vm.define``'s own checks (the agent trusts no appliance to have made
    them): defining over the domain the image came from, or over any domain of the host,
    would replace a VM's definition with disks on the appliance's export."""
    source = f"tandem-test-src-{os.getpid()}"
    taken = f"tandem-test-taken-{os.getpid()}"
    vmguest.remove_domain(source)
    vmguest.remove_domain(taken)
    (tmp_path / "taken.xml").write_text(BARE.format(name=taken))
    vmguest.virsh("define", str(tmp_path / "taken.xml"))
    try:
        before = vmguest.virsh("dumpxml", taken).stdout
        onto_source = agent.client.post(
            "/api/v1/vms/define", headers=agent.auth, json=define_body(source, source)
        )
        assert onto_source.status_code == 422, onto_source.text
        assert "never failed over onto the domain it came from" in onto_source.json()["message"]
        assert vmguest.virsh("dominfo", source, check=False).returncode != 0  # none defined
        onto_taken = agent.client.post(
            "/api/v1/vms/define", headers=agent.auth, json=define_body(taken, source)
        )
        assert onto_taken.status_code == 409, onto_taken.text
        assert onto_taken.json()["error"] == "AlreadyExists"
        assert vmguest.virsh("dumpxml", taken).stdout == before  # left as it was
    finally:
        vmguest.remove_domain(source)
        vmguest.remove_domain(taken)


def test_an_empty_domain_for_a_failback_is_checked_made_and_removed_with_its_volumes(
    agent: Agent, libvirt_host: None, tmp_path: Path
) -> None:
    """``agent.vm.define_empty`` (a failback ``--target new`` at production): the agent
    refuses the source's name, a name that exists and a pool it lacks, touching nothing;
    else the domain is defined powered off with a new UUID, its NIC's MAC and one empty
    qcow2 v3 volume per disk in the pool, which ``remove`` deletes with it."""
    tag = os.getpid()
    source, taken, new = (f"tandem-test-{w}-{tag}" for w in ("src", "taken", "new"))
    pool = f"tandem-test-pool-{tag}"
    (tmp_path / "pool").mkdir()
    for name in (source, taken, new):
        vmguest.remove_domain(name)
    (tmp_path / "taken.xml").write_text(BARE.format(name=taken))
    vmguest.virsh("define", str(tmp_path / "taken.xml"))
    vmguest.virsh("pool-define-as", pool, "dir", "--target", str(tmp_path / "pool"))
    vmguest.virsh("pool-start", pool)
    mac = "52:54:00:12:34:56"
    source_uuid = "6c0c2c55-3f6e-4f43-9d53-000000000001"
    xml = (
        BARE.format(name=source)
        .replace("</name>", f"</name><uuid>{source_uuid}</uuid>")
        .replace(
            "</devices>", f"<interface type='user'><mac address='{mac}'/></interface></devices>"
        )
    )
    body = {"xml": xml, "disks": [{"target": "vda", "size": 1 << 20}], "pool": pool}

    def define(**fields: object) -> httpx.Response:
        return agent.client.post(
            "/api/v1/vms/define-empty",
            headers=agent.auth,
            json={**body, "source_domain": source, **fields},
        )

    try:
        assert define(name=source).status_code == 422
        assert define(name=taken).json()["error"] == "AlreadyExists"
        assert define(name=new, pool="no-such-pool").json()["error"] == "NotFound"
        assert define(name=new, disks=[{"target": "../x", "size": 1}]).status_code == 422
        assert list((tmp_path / "pool").iterdir()) == []
        assert vmguest.virsh("dominfo", new, check=False).returncode != 0

        made = define(name=new)
        assert made.status_code == 200, made.text
        volume = tmp_path / "pool" / f"{new}-vda.qcow2"
        assert made.json()["volumes"] == [f"{pool}/{new}-vda.qcow2"]
        assert vmguest.virsh("domstate", new).stdout.strip() == "shut off"
        defined = vmguest.virsh("dumpxml", "--inactive", new).stdout
        assert f"<source file='{volume}'" in defined and f"<mac address='{mac}'" in defined
        assert made.json()["uuid"] != source_uuid  # a UUID of its own
        info = vmguest.virsh("vol-dumpxml", f"{new}-vda.qcow2", "--pool", pool).stdout
        assert "<compat>1.1</compat>" in info  # keeps persistent dirty bitmaps
        gone = agent.client.post("/api/v1/vms/remove", headers=agent.auth, json={"name": new})
        assert gone.json()["removed"] is True
        assert not volume.exists()
    finally:
        for name in (source, taken, new):
            vmguest.remove_domain(name)
        vmguest.virsh("pool-destroy", pool, check=False)
        vmguest.virsh("pool-undefine", pool, check=False)
