"""A real libvirt host and a tiny real guest for the VM tests (QEMU under TCG).

- ``libvirt_host()`` makes sure ``qemu:///system`` answers: when ``virsh version`` does not,
  it starts ``virtlogd -d`` and ``libvirtd -d`` (there is no systemd here) and returns the
  pids it started, which ``stop_started`` ends; what was already running is left alone.
- ``guest_boot()`` gives a Debian cloud kernel (``apt-get download`` of the package the
  ``linux-image-cloud-amd64`` meta-package names, unpacked with ``dpkg-deb -x`` into a cache
  folder) and a busybox initramfs built here with ``cpio``, holding the virtio modules.
- The guest's ``/init`` boots from its disk ``/dev/vda`` the way a real machine does: a disk
  without the header ``TANDEM-DISK`` is formatted with a known pattern (marker from the kernel
  command line ``tandem.marker=``); a disk with it is left as it is. Either way it syncs and
  prints ``TANDEM-SUM <md5 of /dev/vda>`` on the serial console, then obeys lines read from
  the console: ``rewrite WORD`` overwrites 1 MiB at 32 MiB and prints the new sum,
  ``scatter N`` rewrites N 64 KiB blocks spread over the disk, ``off`` powers off. So
  "what the guest wrote at production is what a new VM at DR reads" is the DR guest
  printing the production guest's last sum.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tandem.drill.guest import (  # the guest itself lives with the demo that runs it too
    AGENT,
    CACHE,
    INIT,
    MODULES,
    PATTERN_MIB,
    REWRITE_AT_MIB,
    URI,
    Boot,
    Console,
    disk_format,
    domain_xml,
    guest_boot,
    libvirt_answers,
    make_disk,
    md5_of,
    remove_domain,
    start_with_console,
    virsh,
)

__all__ = [
    "AGENT",
    "CACHE",
    "INIT",
    "LOCK",
    "MODULES",
    "PATTERN_MIB",
    "REWRITE_AT_MIB",
    "URI",
    "Boot",
    "Console",
    "disk_format",
    "domain_xml",
    "guest_boot",
    "libvirt_answers",
    "libvirt_host",
    "libvirt_session",
    "make_disk",
    "md5_of",
    "remove_domain",
    "second_libvirt",
    "start_with_console",
    "stop_started",
    "virsh",
]

LOCK = Path(tempfile.gettempdir()) / "tandem-tests-libvirt.lock"


def _pid_of(pidfile: str) -> int | None:
    try:
        return int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def libvirt_session() -> Iterator[None]:
    """``qemu:///system`` answering for the duration; the daemons this started are stopped
    at the end unless another test process (pytest-xdist) still uses them.

    Two locks: ``LOCK.start`` is held exclusively only while one process checks and starts
    the daemons; ``LOCK`` is held shared by every user for its whole session, and the starter
    stops the daemons only if it can take it exclusively at the end (nobody else uses them).
    A second process never waits for the first one's session, only for its start."""
    starting = LOCK.with_name(LOCK.name + ".start")
    with open(LOCK, "a+") as users, open(starting, "a+") as start:
        fcntl.flock(start, fcntl.LOCK_EX)
        try:
            started = libvirt_host()  # [] when it already answered
            fcntl.flock(users, fcntl.LOCK_SH)
        finally:
            fcntl.flock(start, fcntl.LOCK_UN)
        try:
            yield
        finally:
            if started:
                fcntl.flock(start, fcntl.LOCK_EX)
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # still in use by another test process: leave it running
                else:
                    stop_started(started)
                finally:
                    fcntl.flock(start, fcntl.LOCK_UN)


def _kvm_device_as_udev_leaves_it() -> None:
    """``/dev/kvm`` as udev sets it on a Debian host (group ``kvm``, mode 0660).

    Without udev it stays root-only. libvirt then probes QEMU as root and finds KVM, while its
    cache check, made as the ``libvirt-qemu`` user, finds ``/dev/kvm`` unusable and throws
    the probe away: every lookup probes QEMU again (about 2 s each, minutes under load), and
    ``virsh define`` times out. The guests themselves run under TCG (``type='qemu'``).
    """
    kvm = Path("/dev/kvm")
    if os.geteuid() != 0 or not kvm.exists():
        return
    with contextlib.suppress(KeyError, OSError):
        gid = grp.getgrnam("kvm").gr_gid
        if kvm.stat().st_gid != gid or kvm.stat().st_mode & 0o060 != 0o060:
            os.chown(kvm, 0, gid)
            os.chmod(kvm, 0o660)


def libvirt_host() -> list[int]:
    """Make ``qemu:///system`` answer; returns the pids of the daemons started here."""
    _kvm_device_as_udev_leaves_it()
    if libvirt_answers():
        return []
    for tool in ("libvirtd", "virtlogd", "qemu-system-x86_64"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(
                f"{tool} is missing: install libvirt-daemon-system libvirt-daemon-driver-qemu "
                "qemu-system-x86 (`make tools` does, as root)"
            )
    started = []
    for daemon, pidfile in (
        ("virtlogd", "/run/virtlogd.pid"),
        ("libvirtd", "/run/libvirtd.pid"),
    ):
        if _pid_of(pidfile) is not None and Path(f"/proc/{_pid_of(pidfile)}").exists():
            continue
        subprocess.run([daemon, "-d"], check=False, timeout=60)
        pid = _pid_of(pidfile)
        if pid is not None:
            started.append(pid)
    deadline = time.monotonic() + 60
    while not libvirt_answers():
        if time.monotonic() > deadline:
            pytest.fail("libvirtd was started but qemu:///system does not answer")
        time.sleep(0.2)
    return started


def stop_started(pids: list[int]) -> None:
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@contextmanager
def second_libvirt(folder: Path, qemu_conf: str = "") -> Iterator[str]:
    """A second, independent libvirt (QEMU) hypervisor on this machine; yields its URI.

    A ``libvirtd`` of its own in a private mount namespace, where its state, configuration,
    logs and runtime folders (``/run/libvirt``, ``/var/lib/libvirt``, ``/etc/libvirt``…)
    are folders of ``folder``; its socket is in ``folder/sock`` for agents and ``virsh`` to
    reach. It holds its own domains, so a failed-over VM can be defined on it with the
    same name and UUID as on the system one, as on two hosts of a cluster. ``qemu_conf``:
    more lines for its ``qemu.conf`` (say ``nbd_tls_x509_cert_dir``). Root only."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a second libvirtd needs root and unshare")
    for sub in (*SECOND_BINDS, "sock"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    shutil.copytree("/etc/libvirt", folder / "etc", dirs_exist_ok=True, symlinks=True)
    for defined in ("qemu", "qemu/networks/autostart", "storage", "storage/autostart"):
        for xml in (folder / "etc" / defined).glob("*.xml"):
            xml.unlink()  # the system hypervisor's domains, networks and pools stay there
    with open(folder / "etc" / "libvirtd.conf", "a") as conf:
        conf.write(f'\nunix_sock_dir = "{folder / "sock"}"\n')
    with open(folder / "etc" / "qemu.conf", "a") as conf:
        conf.write('\nstdio_handler = "file"\n')  # no virtlogd in its namespace
        conf.write(qemu_conf + "\n")
    uri = _spawn_second_libvirtd(folder)
    try:
        yield uri
    finally:
        pid = _pid_of(str(folder / "libvirtd.pid"))
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


SECOND_BINDS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "etc": "/etc/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}


def _spawn_second_libvirtd(folder: Path) -> str:
    """Start the second libvirtd of ``folder`` in a new private mount namespace; its URI
    once it answers."""
    binds = " && ".join(f"mount --bind {folder / s} {t}" for s, t in SECOND_BINDS.items())
    pidfile = folder / "libvirtd.pid"
    subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"{binds} && exec libvirtd -d -p {pidfile}",
        ],
        check=True,
        timeout=60,
    )
    uri = f"qemu+unix:///system?socket={folder / 'sock' / 'libvirt-sock'}"
    deadline = time.monotonic() + 60
    while virsh("version", check=False, uri=uri).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"the second libvirtd does not answer at {uri}")
        time.sleep(0.2)
    return uri


def second_libvirtd_pid(folder: Path) -> int:
    pid = _pid_of(str(folder / "libvirtd.pid"))
    assert pid is not None, f"no libvirtd pid in {folder}"
    return pid


def restart_second_libvirt(folder: Path) -> None:
    """Kill the second libvirtd of ``folder`` (SIGKILL: it ends nothing on its way out) and
    start it again; its guests keep running and it reconnects to them, as after a crash."""
    pid = second_libvirtd_pid(folder)
    os.kill(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and _state_of(pid) != "Z":
        if time.monotonic() > deadline:
            pytest.fail(f"libvirtd {pid} did not end after SIGKILL")
        time.sleep(0.05)
    _spawn_second_libvirtd(folder)


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"
