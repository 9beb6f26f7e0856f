"""Latents record the voxel spacing of a volume's model input, and an image's stage-2 latent.

Volumes are encoded at native spacing since preprocessing vol-v3 (downsampled only above a voxel
budget), so one z voxel no longer stands for a fixed size: ``spacing``. Re-ranking compares
whole stage-2 latents; computing them per query costs the model's head over every candidate, so
ingest stores them: ``head``. Rows stored before this migration keep NULL in both.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("latents") as batch:
        batch.add_column(sa.Column("spacing", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("head", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("latents") as batch:
        batch.drop_column("head")
        batch.drop_column("spacing")
