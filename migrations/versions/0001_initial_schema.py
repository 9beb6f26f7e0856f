"""Initial schema: spaces, studies, images, latents, vectors, ingest errors.

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 18:02:42.268513
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ingest_errors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.String(length=32), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('ingest_errors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ingest_errors_run_id'), ['run_id'], unique=False)

    op.create_table('spaces',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('encoder_key', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('weights', sa.String(length=256), nullable=False),
    sa.Column('input_size', sa.Integer(), nullable=False),
    sa.Column('preprocessing', sa.String(length=32), nullable=False),
    sa.Column('pooling', sa.String(length=64), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    with op.batch_alter_table('spaces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_spaces_encoder_key'), ['encoder_key'], unique=False)

    op.create_table('studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_key', sa.String(length=512), nullable=False),
    sa.Column('study_uid', sa.String(length=128), nullable=True),
    sa.Column('label', sa.String(length=512), nullable=False),
    sa.Column('patient_hash', sa.String(length=64), nullable=True),
    sa.Column('study_date', sa.Date(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_key')
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_studies_patient_hash'), ['patient_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_studies_study_uid'), ['study_uid'], unique=False)

    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('source_uri', sa.Text(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('sop_uid', sa.String(length=128), nullable=True),
    sa.Column('series_uid', sa.String(length=128), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('body_part', sa.String(length=64), nullable=True),
    sa.Column('view', sa.String(length=32), nullable=True),
    sa.Column('laterality', sa.String(length=8), nullable=True),
    sa.Column('study_date', sa.Date(), nullable=True),
    sa.Column('patient_sex', sa.String(length=8), nullable=True),
    sa.Column('patient_age', sa.String(length=8), nullable=True),
    sa.Column('patient_hash', sa.String(length=64), nullable=True),
    sa.Column('accession_hash', sa.String(length=64), nullable=True),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('extra', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sha256'),
    sa.UniqueConstraint('sop_uid')
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_body_part'), ['body_part'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_modality'), ['modality'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_patient_hash'), ['patient_hash'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_series_uid'), ['series_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_study_date'), ['study_date'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_study_id'), ['study_id'], unique=False)

    op.create_table('latents',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('encoder_key', sa.String(length=64), nullable=False),
    sa.Column('shape', sa.String(length=64), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('image_id', 'encoder_key', name='uq_latents_image_encoder')
    )
    op.create_table('vectors',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('space_id', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['space_id'], ['spaces.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('image_id', 'space_id', name='uq_vectors_image_space')
    )
    with op.batch_alter_table('vectors', schema=None) as batch_op:
        batch_op.create_index('ix_vectors_space_id_id', ['space_id', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('vectors', schema=None) as batch_op:
        batch_op.drop_index('ix_vectors_space_id_id')

    op.drop_table('vectors')
    op.drop_table('latents')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_study_id'))
        batch_op.drop_index(batch_op.f('ix_images_study_date'))
        batch_op.drop_index(batch_op.f('ix_images_series_uid'))
        batch_op.drop_index(batch_op.f('ix_images_patient_hash'))
        batch_op.drop_index(batch_op.f('ix_images_modality'))
        batch_op.drop_index(batch_op.f('ix_images_body_part'))

    op.drop_table('images')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_study_uid'))
        batch_op.drop_index(batch_op.f('ix_studies_patient_hash'))

    op.drop_table('studies')
    with op.batch_alter_table('spaces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_spaces_encoder_key'))

    op.drop_table('spaces')
    with op.batch_alter_table('ingest_errors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ingest_errors_run_id'))

    op.drop_table('ingest_errors')
