"""Alembic revisions, one module per schema change (0001, 0002, ...)."""
