"""DICOM e-mail gateway: byte sizes of sent and received instances (transfer statistics)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 14:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('outbound_mail', schema=None) as batch_op:
        batch_op.add_column(sa.Column('size', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('inbound_part', schema=None) as batch_op:
        batch_op.add_column(sa.Column('size', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inbound_part', schema=None) as batch_op:
        batch_op.drop_column('size')
    with op.batch_alter_table('outbound_mail', schema=None) as batch_op:
        batch_op.drop_column('size')
