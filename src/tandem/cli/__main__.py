"""`python -m tandem.cli` runs the `tandem` command (used by tests and when not installed)."""

from tandem.cli.main import run

run()
