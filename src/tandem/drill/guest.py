"""A tiny real guest for libvirt (QEMU under TCG): what `tandem demo --vm` runs at
production and the VM tests (``tests/vmguest.py``) use.

- ``guest_boot()`` gives a Debian cloud kernel (``apt-get download`` of the package the
  ``linux-image-cloud-amd64`` meta-package names, unpacked with ``dpkg-deb -x`` into a cache
  folder, ``$TANDEM_VM_CACHE``) and a busybox initramfs built here with ``cpio``, holding the
  virtio modules.
- The guest's ``/init`` boots from its disk ``/dev/vda`` the way a real machine does: a disk
  without the header ``TANDEM-DISK`` is formatted with a known pattern (marker from the kernel
  command line ``tandem.marker=``); a disk with it is left as it is. Either way it syncs and
  prints ``TANDEM-SUM <md5 of /dev/vda>`` on the serial console, then obeys lines read from
  the console: ``rewrite WORD`` overwrites 1 MiB at 32 MiB and prints the new sum,
  ``scatter N`` rewrites N 64 KiB blocks spread over the disk, ``off`` powers off. So
  "what the guest wrote at production is what a new VM at DR reads" is the DR guest
  printing the production guest's last sum.
- A domain with a guest-agent channel (``AGENT``) gets it served by the host's real
  ``qemu-ga``, copied with its shared libraries into the initramfs when
  ``guest_boot(guest_agent=True)``; else the guest opens the channel and never answers (an
  agent hung in a freeze).
- ``domain_xml()``, ``make_disk()``, ``start_with_console()`` / ``Console``,
  ``remove_domain()``: define, run and talk to it with ``virsh``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import TandemError


class GuestUnavailable(TandemError):
    """The demo guest cannot be built: {detail}. Install what is missing (`make tools` does,
    as root) and try again."""

    exit_code = 2


class ConsoleTimeout(AssertionError):
    """The guest did not print what was expected on its serial console in time."""


URI = "qemu:///system"
CACHE = Path(
    os.environ.get("TANDEM_VM_CACHE")
    or ("/var/cache/tandem-tests" if os.geteuid() == 0 else "~/.cache/tandem-tests")
).expanduser()
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
# A guest-agent channel, if the domain has one, is served by the real qemu-ga when the
# initramfs holds it (guest_boot(guest_agent=True)); else it is opened and never answered:
# a guest agent that hangs.
for port in /sys/class/virtio-ports/*; do
  if [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    if [ -x /usr/sbin/qemu-ga ]; then
      mkdir -p /var/run
      LD_LIBRARY_PATH=%(libdirs)s /usr/sbin/qemu-ga -m virtio-serial -p "/dev/${port##*/}" \
        -t /var/run -f /var/run/qemu-ga.pid -F/etc/qemu/fsfreeze-hook \
        < /dev/null > /dev/ttyS0 2>&1 &
      say "TANDEM-AGENT qemu-ga"
    else
      exec 3<>"/dev/${port##*/}"
      say "TANDEM-AGENT silent"
    fi
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


@dataclass(frozen=True)
class Boot:
    kernel: Path
    initrd: Path


def kernel() -> tuple[Path, Path]:
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
            raise GuestUnavailable(
                detail="apt-cache names no linux-image-cloud-amd64 kernel (run apt-get update)"
            )
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


QEMU_GA = Path("/usr/sbin/qemu-ga")
"""The host's guest agent (Debian ``qemu-guest-agent``), copied into the guest on request."""


FSFREEZE_HOOK = """#!/bin/busybox sh
# qemu-ga runs this before it freezes the file systems and after it thaws them.
echo "TANDEM-FSFREEZE $1" > /dev/ttyS0
"""
"""The guest's fsfreeze hook: it prints ``TANDEM-FSFREEZE freeze|thaw`` on the console."""


def _shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries ``ldd`` names for ``binary``, the dynamic loader included."""
    out = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    found: list[Path] = []
    for line in out.splitlines():
        words = line.split()
        if "=>" in words:  # libfoo.so.1 => /lib/.../libfoo.so.1 (0x...)
            at = words.index("=>") + 1
            if at < len(words) and words[at].startswith("/"):
                found.append(Path(words[at]))
        elif words and words[0].startswith("/"):  # /lib64/ld-linux-x86-64.so.2 (0x...)
            found.append(Path(words[0]))
    return found


def _install_guest_agent(root: Path) -> list[str]:
    """Copy qemu-ga and its libraries into ``root`` at their host paths; their folders."""
    if not QEMU_GA.exists():
        raise GuestUnavailable(detail=f"{QEMU_GA} is missing (Debian package qemu-guest-agent)")
    folders: list[str] = []
    for path in [QEMU_GA, *_shared_libraries(QEMU_GA)]:
        target = root / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)  # follows symlinks: the file itself, under its ldd name
        if path != QEMU_GA and str(path.parent) not in folders:
            folders.append(str(path.parent))
    hook = root / "etc" / "qemu" / "fsfreeze-hook"
    hook.parent.mkdir(parents=True)
    hook.write_text(FSFREEZE_HOOK)
    hook.chmod(0o755)
    return folders


def guest_boot(folder: Path, *, guest_agent: bool = False) -> Boot:
    """The kernel and a freshly built initramfs (in ``folder``) of the test guest.

    ``guest_agent``: the initramfs holds the host's ``qemu-ga`` (and its shared libraries),
    which ``/init`` starts on the guest-agent channel of a domain that has one (``AGENT``),
    with a fsfreeze hook that prints ``TANDEM-FSFREEZE freeze`` / ``TANDEM-FSFREEZE thaw`` on
    the console; without it such a channel is opened and never answered."""
    busybox = Path("/bin/busybox")
    if not busybox.exists() or shutil.which("cpio") is None:
        raise GuestUnavailable(detail="busybox-static and cpio are missing")
    vmlinuz, modules = kernel()
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
    libdirs = _install_guest_agent(root) if guest_agent else []
    init = root / "init"
    init.write_text(
        INIT
        % {
            "modules": " ".join(names),
            "pattern": PATTERN_MIB << 20,
            "rewrite": REWRITE_AT_MIB,
            "libdirs": ":".join(libdirs) or "/lib",
        }
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
"""The guest agent's channel: served by qemu-ga in a guest built with
``guest_boot(guest_agent=True)``, else opened and never answered."""


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
                raise ConsoleTimeout(
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
