"""``images.vm_existing``: the VM a presented image runs as is an existing domain.

A test failover, failover or mount with ``--vm DOMAIN`` makes an existing domain of the
host the target (powered off, its disks replaced by the appliance's export, its own
definition kept in its libvirt metadata); ``vm_name`` names it and this flag says it is
the operator's domain, so withdrawing the image gives it its definition back rather than
removing it. False for every other image (and for images recorded before).

Revision ID: 0011_vmtarget
Revises: 0010_vmhosts
Create Date: 2026-12-02 17:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_vmtarget"
down_revision: str | Sequence[str] | None = "0010_vmhosts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(
            sa.Column("vm_existing", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("vm_existing")
