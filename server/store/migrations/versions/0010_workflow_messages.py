"""DICOM e-mail gateway: workflow messages (issue 5) — a transfer_job of kind "message" carries one signed and
encrypted FHIR resource (a Task state report or a priors request) instead of DICOM instances

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-23 17:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('transfer_job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='transfer'))


def downgrade() -> None:
    with op.batch_alter_table('transfer_job', schema=None) as batch_op:
        batch_op.drop_column('kind')
