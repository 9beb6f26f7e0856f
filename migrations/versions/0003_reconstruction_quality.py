"""Reconstruction quality per image: PSNR and SSIM of decode(z) against the normalised input.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 22:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("recon_psnr", sa.Float(), nullable=True))
        batch.add_column(sa.Column("recon_ssim", sa.Float(), nullable=True))
        batch.create_index("ix_images_recon_psnr", ["recon_psnr"])


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_recon_psnr")
        batch.drop_column("recon_ssim")
        batch.drop_column("recon_psnr")
