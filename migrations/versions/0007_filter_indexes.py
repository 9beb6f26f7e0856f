"""Indexes on the expressions filters compare (``upper(coalesce(column, ''))``), for selective cohorts.

A search filtered to one modality (or body part, view, laterality, sex) finds its cohort through
these instead of scanning every image row: at a million images, 1 % of them in a few milliseconds.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = ("modality", "body_part", "view", "laterality", "patient_sex")


def upgrade() -> None:
    for column in COLUMNS:
        op.create_index(f"ix_images_{column}_filter", "images", [sa.text(f"upper(coalesce(\"{column}\", ''))")])


def downgrade() -> None:
    for column in COLUMNS:
        op.drop_index(f"ix_images_{column}_filter", table_name="images")
