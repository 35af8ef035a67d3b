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
import hashlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

URI = "qemu:///system"
CACHE = Path(
    os.environ.get("TANDEM_VM_CACHE")
    or ("/var/cache/tandem-tests" if os.geteuid() == 0 else "~/.cache/tandem-tests")
).expanduser()
LOCK = Path(tempfile.gettempdir()) / "tandem-tests-libvirt.lock"
MODULES = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "drivers/char/virtio_console.ko",
]
PATTERN_MIB = 24
REWRITE_AT_MIB = 32

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in %(modules)s; do insmod /lib/modules/$m; done
marker=none
for word in $(cat /proc/cmdline); do
  case "$word" in tandem.marker=*) marker="${word#tandem.marker=}";; esac
done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
say() { echo "$@" > /dev/ttyS0; }
# A guest-agent channel, if the domain has one, is opened and never answered: a guest
# agent that hangs (the busybox guest has no qemu-ga).
for port in /sys/class/virtio-ports/*; do
  if [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    exec 3<>"/dev/${port##*/}"
    say "TANDEM-AGENT silent"
  fi
done
sum() { say "TANDEM-SUM $(md5sum /dev/vda | cut -d' ' -f1)"; }
if [ "$(head -c 11 /dev/vda)" = "TANDEM-DISK" ]; then
  say "TANDEM-BOOT existing"
else
  { printf 'TANDEM-DISK %%s\n' "$marker"; yes "$marker pattern line" | head -c %(pattern)d; } \
    | dd of=/dev/vda bs=1M conv=fsync 2>/dev/null
  sync
  say "TANDEM-BOOT formatted $marker"
fi
sync
echo 3 > /proc/sys/vm/drop_caches
sum
while read -r cmd arg < /dev/ttyS0; do
  case "$cmd" in
    rewrite)
      yes "$arg rewritten" | head -c 1048576 \
        | dd of=/dev/vda bs=1M seek=%(rewrite)d conv=fsync 2>/dev/null
      sync; echo 3 > /proc/sys/vm/drop_caches; sum;;
    scatter)
      # $arg blocks of 64 KiB spread evenly over the disk (a 1%% rewrite, for the benchmark)
      blocks=$(( $(cat /sys/block/vda/size) / 128 )); step=$(( blocks / arg )); i=0
      while [ $i -lt $arg ]; do
        yes "scatter $i" | head -c 65536 \
          | dd of=/dev/vda bs=65536 seek=$(( i * step )) conv=notrunc 2>/dev/null
        i=$((i+1))
      done
      sync; say "TANDEM-SCATTERED $arg";;
    sum) echo 3 > /proc/sys/vm/drop_caches; sum;;
    off) sync; poweroff -f;;
  esac
done
"""


def virsh(*args: str, check: bool = True, uri: str = URI) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60, check=check
    )


def libvirt_answers() -> bool:
    if shutil.which("virsh") is None:
        return False
    try:
        return virsh("version", check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


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


@dataclass(frozen=True)
class Boot:
    kernel: Path
    initrd: Path


def _kernel() -> tuple[Path, Path]:
    """(vmlinuz, modules folder) of a Debian cloud kernel, downloaded once into CACHE."""
    found = sorted(CACHE.glob("kernel/*/boot/vmlinuz-*"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        deps = subprocess.run(
            ["apt-cache", "depends", "linux-image-cloud-amd64"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        package = next(
            (
                line.split()[1]
                for line in deps.splitlines()
                if line.strip().startswith("Depends: linux-image-")
            ),
            None,
        )
        if package is None:
            pytest.fail("apt-cache names no linux-image-cloud-amd64 kernel: run apt-get update")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            subprocess.run(
                ["apt-get", "download", package],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=600,
            )
            (deb,) = Path(tmp).glob("*.deb")
            out = CACHE / "kernel" / package
            staging = Path(tmp) / "x"
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out, ignore_errors=True)
            staging.rename(out)
        found = sorted(CACHE.glob("kernel/*/boot/vmlinuz-*"))
    vmlinuz = found[-1]
    version = vmlinuz.name.removeprefix("vmlinuz-")
    return vmlinuz, vmlinuz.parents[1] / "lib" / "modules" / version / "kernel"


def guest_boot(folder: Path) -> Boot:
    """The kernel and a freshly built initramfs (in ``folder``) of the test guest."""
    busybox = Path("/bin/busybox")
    if not busybox.exists() or shutil.which("cpio") is None:
        pytest.fail("busybox-static and cpio are missing: install them (`make tools` does)")
    vmlinuz, modules = _kernel()
    root = folder / "initramfs"
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("bin", "dev", "proc", "sys", "lib/modules"):
        (root / sub).mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    names = []
    for module in MODULES:
        src = modules / module
        shutil.copy(src, root / "lib" / "modules" / src.name)
        names.append(src.name)
    init = root / "init"
    init.write_text(
        INIT % {"modules": " ".join(names), "pattern": PATTERN_MIB << 20, "rewrite": REWRITE_AT_MIB}
    )
    init.chmod(0o755)
    initrd = folder / "initrd.cpio"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with open(initrd, "wb") as out:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input="\n".join(files).encode(),
            stdout=out,
            check=True,
        )
    return Boot(vmlinuz, initrd)


def domain_xml(
    name: str, boot: Boot, disks: list[Path], marker: str, *, agent_channel: bool = False
) -> str:
    targets = "abcdefgh"
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='{disk_format(path)}'/>"
        f"<source file='{path}'/><target dev='vd{targets[i]}' bus='virtio'/></disk>"
        for i, path in enumerate(disks)
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>96</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{boot.kernel}</kernel><initrd>{boot.initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 tandem.marker={marker}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    {disk_xml}
    <interface type='user'><model type='virtio'/></interface>
    {AGENT if agent_channel else ""}
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""


AGENT = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
"""The guest agent's channel (the guest opens it and never answers)."""


def disk_format(path: Path) -> str:
    """A test disk's format, by its name: ``*.raw`` is raw, anything else qcow2."""
    return "raw" if path.suffix == ".raw" else "qcow2"


def make_disk(path: Path, mib: int) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", disk_format(path), str(path), f"{mib}M"],
        check=True,
        timeout=60,
    )
    return path


class Console:
    """The serial console of a running domain (its pty), read line by line with a deadline."""

    def __init__(self, domain: str, uri: str = URI) -> None:
        xml = virsh("dumpxml", domain, uri=uri).stdout
        start = xml.index("<serial type='pty'>")
        path_at = xml.index("path='", start) + len("path='")
        self.path = xml[path_at : xml.index("'", path_at)]
        self.fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.buffer = b""
        self.lines: list[str] = []

    def close(self) -> None:
        os.close(self.fd)

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def expect(self, prefix: str, timeout: float = 240.0) -> str:
        """The next line starting with ``prefix`` (what precedes it is kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                self.lines.append(line)
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {prefix!r} on the console in {timeout:.0f} s; it said: "
                    + " | ".join(self.lines[-20:])
                )
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    self.buffer += os.read(self.fd, 4096)


def start_with_console(domain: str, uri: str = URI) -> Console:
    """Start ``domain`` paused, attach to its console, then let it run (nothing is missed)."""
    virsh("start", "--paused", domain, uri=uri)
    console = Console(domain, uri)
    virsh("resume", domain, uri=uri)
    return console


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def remove_domain(name: str, uri: str = URI) -> None:
    virsh("destroy", name, check=False, uri=uri)
    virsh("undefine", name, "--checkpoints-metadata", "--nvram", check=False, uri=uri)


@contextmanager
def second_libvirt(folder: Path) -> Iterator[str]:
    """A second, independent libvirt (QEMU) hypervisor on this machine; yields its URI.

    A ``libvirtd`` of its own in a private mount namespace, where its state, configuration,
    logs and runtime folders (``/run/libvirt``, ``/var/lib/libvirt``, ``/etc/libvirt``…)
    are folders of ``folder``; its socket is in ``folder/sock`` for agents and ``virsh`` to
    reach. It holds its own domains, so a failed-over VM can be defined on it with the
    same name and UUID as on the system one, as on two hosts of a cluster. Root only."""
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
