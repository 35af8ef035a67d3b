"""PostgreSQL apps: a base image's backup (``images.pg``) and the WAL segments held.

Revision ID: 0008_postgresql
Revises: 0007_template_max_lag
Create Date: 2026-12-02 11:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_postgresql"
down_revision: str | Sequence[str] | None = "0007_template_max_lag"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("pg", sa.JSON(), nullable=True))
    op.create_table(
        "wal_segments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("app_id", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=24), nullable=False),
        sa.Column("timeline", sa.Integer(), nullable=False),
        sa.Column("start_lsn", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mirrored", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["app_id"],
            ["apps.id"],
            name=op.f("fk_wal_segments_app_id_apps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wal_segments")),
    )
    op.create_index("uq_wal_segments_app_id_name", "wal_segments", ["app_id", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_wal_segments_app_id_name", table_name="wal_segments")
    op.drop_table("wal_segments")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("pg")
