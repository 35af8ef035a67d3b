# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv when missing and installs the project with its test extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VM_STAMP := $(VENV)/.installed-vm

.PHONY: demo test lint typecheck bench bench-tools clean tools

# The NBD tests read exports with real clients from Debian (qemu-img, nbdcopy, nbdsh); the
# console tests drive Debian's Chromium; the live-application tests make btrfs and XFS file
# systems and run PostgreSQL under pgbench. On a fresh Debian machine as root they are
# installed here; elsewhere the tests that need them fail saying which package to install.
# The VM tests run real guests under libvirt + QEMU (TCG): a busybox initramfs made with cpio
# and a Debian kernel the tests download once, with the host's qemu-ga (qemu-guest-agent)
# copied in for the guest-agent tests; libvirt-dev and pkg-config build the Python
# bindings (the `vm` extra), which `make test` installs after them.
# pyfuse3 (the FUSE presentation of file trees) builds against libfuse3-dev with pkg-config
# when installed, so the tools come before the venv; fuse3 brings fusermount3.
TOOLS_PKGS := qemu-utils libnbd-bin python3-libnbd chromium btrfs-progs xfsprogs postgresql \
  libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 libvirt-dev pkg-config \
  busybox-static cpio qemu-guest-agent fuse3 libfuse3-dev \
  swift-proxy swift-account swift-container swift-object memcached

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The libvirt and FUSE bindings only for the tests, after `tools` installed what they build
# against: `make demo` keeps working where libvirt and libfuse3-dev are absent (an agent
# without pyfuse3 presents file trees as full copies and says so on the job).
$(VM_STAMP): $(STAMP) | tools
	$(BIN)/python -m pip install --quiet -e '.[test,vm,fuse]'
	touch $(VM_STAMP)

demo: $(STAMP)
	$(BIN)/tandem demo

lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check

# mypy checks src/ (strict) and tests/ (relaxed: see [tool.mypy] in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

tools:
	@if ! command -v qemu-img >/dev/null || ! command -v nbdcopy >/dev/null \
	    || ! command -v nbdsh >/dev/null || ! test -x /usr/bin/chromium \
	    || ! command -v mkfs.btrfs >/dev/null || ! command -v mkfs.xfs >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	    || ! command -v virsh >/dev/null || ! command -v qemu-system-x86_64 >/dev/null \
	    || ! pkg-config --exists libvirt 2>/dev/null || ! test -x /bin/busybox \
	    || ! command -v cpio >/dev/null || ! test -x /usr/sbin/qemu-ga \
	    || ! command -v fusermount3 >/dev/null || ! pkg-config --exists fuse3 2>/dev/null \
	    || ! test -x /usr/bin/swift-proxy-server || ! test -x /usr/bin/swift-object-server \
	    || ! test -x /usr/bin/memcached; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(TOOLS_PKGS) (what the NBD, browser, live-application, VM and S3 tests use)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $(TOOLS_PKGS) >/dev/null; \
	  else \
	    echo "note: install $(TOOLS_PKGS) for the NBD, browser, live-application, VM and S3 tests"; \
	  fi; \
	fi

test: $(STAMP) tools $(VM_STAMP) lint typecheck
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The benchmarks' peers: rsync and restic (storage, replication, failback), pgBackRest
# (postgresql). Installed here on Debian as root; a section whose peer is missing says so.
BENCH_PKGS := rsync restic pgbackrest fio

bench-tools:
	@if ! command -v rsync >/dev/null || ! command -v restic >/dev/null \
	    || ! command -v pgbackrest >/dev/null || ! command -v fio >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(BENCH_PKGS) (the peers the benchmarks compare against)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $(BENCH_PKGS) >/dev/null; \
	  else \
	    echo "note: install $(BENCH_PKGS) for the benchmarks' peers"; \
	  fi; \
	fi

bench: $(VM_STAMP) bench-tools
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
