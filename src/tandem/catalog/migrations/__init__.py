"""Alembic migrations of the catalog (a package so that installs ship them)."""
