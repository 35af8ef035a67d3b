"""Production knows when an app is failed over at the peer: ``apps.peer_active``.

Revision ID: 0004_peer_active
Revises: 0003_console_sessions
Create Date: 2026-12-02 06:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_peer_active"
down_revision: str | Sequence[str] | None = "0003_console_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("apps") as batch:
        batch.add_column(
            sa.Column("peer_active", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("apps") as batch:
        batch.drop_column("peer_active")
