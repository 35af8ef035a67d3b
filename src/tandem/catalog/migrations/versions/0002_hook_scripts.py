"""Hooks are script names, not shell commands: ``apps.start_cmd``/``stop_cmd`` become
``start_hook``/``stop_hook``, and ``freeze_hook``/``thaw_hook`` are added.

An old command is kept only if it is already a valid script name (``pg-stop``): the agent
then runs ``scripts/pg-stop``, or refuses with a message naming the folder if there is none.
Any other command (``systemctl stop web``, ``kill 123``…) is dropped: it named something to
run through a shell, which nothing does any more; an admin registers a script instead.

Revision ID: 0002_hook_scripts
Revises: 0001
Create Date: 2026-12-02 07:00:00.000000
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_hook_scripts"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A copy, not an import: a revision stays what it was when application code changes.
HOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _name_or_none(value: str | None) -> str | None:
    return value if value is not None and HOOK_NAME.fullmatch(value) else None


def upgrade() -> None:
    with op.batch_alter_table("apps", schema=None) as batch_op:
        for hook in ("start", "stop", "freeze", "thaw"):
            batch_op.add_column(sa.Column(f"{hook}_hook", sa.String(length=128), nullable=True))
    apps = sa.table(
        "apps",
        sa.column("id", sa.String),
        sa.column("start_cmd", sa.Text),
        sa.column("stop_cmd", sa.Text),
        sa.column("start_hook", sa.String),
        sa.column("stop_hook", sa.String),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(apps.c.id, apps.c.start_cmd, apps.c.stop_cmd)).all()
    for app_id, start, stop in rows:
        bind.execute(
            apps.update()
            .where(apps.c.id == app_id)
            .values(start_hook=_name_or_none(start), stop_hook=_name_or_none(stop))
        )
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.drop_column("stop_cmd")
        batch_op.drop_column("start_cmd")


def downgrade() -> None:
    with op.batch_alter_table("apps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("start_cmd", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("stop_cmd", sa.Text(), nullable=True))
    # Script names are not carried back: the old code would run them through a shell.
    with op.batch_alter_table("apps", schema=None) as batch_op:
        for hook in ("thaw", "freeze", "stop", "start"):
            batch_op.drop_column(f"{hook}_hook")
