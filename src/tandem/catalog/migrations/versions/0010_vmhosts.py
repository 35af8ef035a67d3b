"""``images.vm_hosts``: the other hypervisor hosts a failed-over VM is defined on.

A failover with ``--hosts H1,H2`` / ``--all-hosts`` defines the new VM on its host (started
there, ``mounted_host``) and, powered off, on each of these (its disks are network disks
every one of them reaches); withdrawing the image removes it from all. A JSON list of host
names; null for every other image (and for images recorded before).

Revision ID: 0010_vmhosts
Revises: 0009_vm
Create Date: 2026-12-02 14:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_vmhosts"
down_revision: str | Sequence[str] | None = "0009_vm"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("vm_hosts", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("vm_hosts")
