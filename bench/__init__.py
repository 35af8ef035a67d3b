"""tandem's benchmarks: tandem and its peers (rsync, restic, cat) on the same data, one run.

``python -m bench`` (``make bench``) prints one table: for each measure tandem's figure, the
peer's figure from the same run, their ratio and the target from the issue. It never passes
or fails; it reports. See ``bench/storage.py`` for what is measured and how.
"""
