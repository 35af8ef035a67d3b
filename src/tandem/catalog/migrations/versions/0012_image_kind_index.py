"""An index on (app_id, kind, created, id) of images.

Retention (``queries.images_beyond``: an app's snapshots past its ``--keep`` newest) and
``latest_image`` filter an app's images by kind; with only (app_id, created, id) each row
was read to check its kind, so a capture at 10,000 images read 10,000 rows to prune one.

Revision ID: 0012_image_kind_index
Revises: 0011_vmtarget
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012_image_kind_index"
down_revision: str | Sequence[str] | None = "0011_vmtarget"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_images_app_id_kind_created_id", "images", ["app_id", "kind", "created", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_images_app_id_kind_created_id", table_name="images")
