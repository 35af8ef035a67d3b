"""The DR drill as a library: what `tandem demo`, the end-to-end tests and `bench/` share.

- ``lab``: daemons (appliances, host agents) as child processes on loopback: create, start,
  stop, crash, always clean up; ``wait_for`` polls for a state with a deadline.
- ``operator``: the ``tandem`` command run as an operator runs it (``--json``, one document).
- ``sampleapp``: an application that keeps writing (SQLite, logs, files, a disk or an NBD
  export), with hold/release to take reference states.
- ``steps``: the two-site drill, step by step, over one shared ``Context``.
- ``report``: the drill's closing report (RPO, failover time, failback downtime, bytes).
- ``guest``: a tiny real libvirt guest (Debian kernel, busybox initramfs, QEMU/TCG) that
  prints its disk's md5 on its serial console; ``vmsteps``: the steps ``tandem demo --vm``
  adds with it (capture, mirror, test failover to a new VM at dr).

The drill drives daemons through their API and CLI like an operator: it imports no
catalog, job or operation code (``tests/test_layers.py``).
"""
