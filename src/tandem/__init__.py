"""tandem: two-site disaster recovery with deduplicated snapshot replication."""

__version__ = "0.1.0"
