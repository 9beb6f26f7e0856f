"""Ingest jobs name the model (hence the space family) they ingest into.

Workers claim only jobs of their own model, so a 2-D worker never takes a job meant for a 3-D
space. Jobs queued before this migration have no model and any worker may take them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 01:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ingest_jobs") as batch:
        batch.add_column(sa.Column("model", sa.String(length=64), nullable=True))
        batch.create_index("ix_ingest_jobs_model", ["model"])


def downgrade() -> None:
    with op.batch_alter_table("ingest_jobs") as batch:
        batch.drop_index("ix_ingest_jobs_model")
        batch.drop_column("model")
