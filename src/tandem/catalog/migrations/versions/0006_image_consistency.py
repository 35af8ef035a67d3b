"""How each image was cut, and what each app's captures may be cut from.

``images.consistency`` (``snapshot-btrfs``, ``reflink``, ``freeze``, ``hooks``,
``crash-unsafe``; null for images recorded before) and ``apps.consistency`` (``auto``,
``snapshot``, ``freeze``, ``hooks``, ``none``; ``auto`` for existing apps).

Revision ID: 0006_image_consistency
Revises: 0005_list_indexes
Create Date: 2026-12-02 07:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_image_consistency"
down_revision: str | Sequence[str] | None = "0005_list_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("consistency", sa.String(32), nullable=True))
    with op.batch_alter_table("apps") as batch:
        batch.add_column(
            sa.Column("consistency", sa.String(16), nullable=False, server_default="auto")
        )


def downgrade() -> None:
    with op.batch_alter_table("apps") as batch:
        batch.drop_column("consistency")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("consistency")
