"""A template's ``max_lag_seconds``: the recovery point age past which its apps are at risk.

Null (the default, and for existing templates): no limit, never at risk.

Revision ID: 0007_template_max_lag
Revises: 0006_image_consistency
Create Date: 2026-12-02 08:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_template_max_lag"
down_revision: str | Sequence[str] | None = "0006_image_consistency"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("templates") as batch:
        batch.add_column(sa.Column("max_lag_seconds", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("templates") as batch:
        batch.drop_column("max_lag_seconds")
