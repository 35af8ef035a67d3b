"""Every list the API pages through has an index behind its order and filters.

Images of an app and jobs are ordered newest first with the id breaking ties (the id is the
cursor of a page), so the indexes end in (created, id); job retention deletes by end time;
garbage collection reads the distinct manifests from an index.

Revision ID: 0005_list_indexes
Revises: 0004_peer_active
Create Date: 2026-12-02 07:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005_list_indexes"
down_revision: str | Sequence[str] | None = "0004_peer_active"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_images_app_id_created", table_name="images")
    op.create_index("ix_images_app_id_created_id", "images", ["app_id", "created", "id"])
    op.create_index("ix_images_manifest", "images", ["manifest"])
    op.drop_index("ix_jobs_status_created", table_name="jobs")
    op.drop_index("ix_jobs_app_created", table_name="jobs")
    op.create_index("ix_jobs_created_id", "jobs", ["created", "id"])
    op.create_index("ix_jobs_status_created_id", "jobs", ["status", "created", "id"])
    op.create_index("ix_jobs_app_created_id", "jobs", ["app", "created", "id"])
    op.create_index("ix_jobs_finished", "jobs", ["finished"])


def downgrade() -> None:
    op.drop_index("ix_jobs_finished", table_name="jobs")
    op.drop_index("ix_jobs_app_created_id", table_name="jobs")
    op.drop_index("ix_jobs_status_created_id", table_name="jobs")
    op.drop_index("ix_jobs_created_id", table_name="jobs")
    op.create_index("ix_jobs_app_created", "jobs", ["app", "created"])
    op.create_index("ix_jobs_status_created", "jobs", ["status", "created"])
    op.drop_index("ix_images_manifest", table_name="images")
    op.drop_index("ix_images_app_id_created_id", table_name="images")
    op.create_index("ix_images_app_id_created", "images", ["app_id", "created"])
