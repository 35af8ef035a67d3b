"""``images.vm_name``: the libvirt domain a presented VM image was defined as on its host.

Set while a VM app's test-failover / failover / mount image is presented as a new VM (its
disks on the appliance's NBD export); withdrawing the image destroys and undefines that
domain. Null for every other image (and for images recorded before).

Revision ID: 0009_vm
Revises: 0008_postgresql
Create Date: 2026-12-02 11:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_vm"
down_revision: str | Sequence[str] | None = "0008_postgresql"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("vm_name", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("vm_name")
