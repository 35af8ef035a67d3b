"""``wal_segments.mirrored_seen``: the point the peer was last told a segment vouches for.

A segment's ``seen`` moves on while its database is idle (every commit acknowledged
before it is held) although no byte is added; the peer learnt the point only with new
bytes, so the DR window of an idle database stayed at its last write, and production's RPO
(judged on what the peer holds) claimed more than the peer had been told. This column says
what the peer was told; a segment whose point ran ahead of it is sent again, bytes or not.
Rows the peer holds whole are taken as told their ``seen``.

Revision ID: 0013_wal_mirrored_seen
Revises: 0012_image_kind_index
Create Date: 2026-12-04 18:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_wal_mirrored_seen"
down_revision: str | Sequence[str] | None = "0012_image_kind_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("wal_segments") as batch:
        batch.add_column(sa.Column("mirrored_seen", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE wal_segments SET mirrored_seen = seen WHERE mirrored >= size")


def downgrade() -> None:
    with op.batch_alter_table("wal_segments") as batch:
        batch.drop_column("mirrored_seen")
