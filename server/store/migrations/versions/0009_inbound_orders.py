"""DICOM e-mail gateway: the order that travelled with an inbound set (order.json, note, emergency flag) and the
consult Task created for it at the receiving site

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 15:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inbound_set', schema=None) as batch_op:
        batch_op.add_column(sa.Column('order_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('note', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('emergency', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('consult_task', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inbound_set', schema=None) as batch_op:
        batch_op.drop_column('consult_task')
        batch_op.drop_column('emergency')
        batch_op.drop_column('note')
        batch_op.drop_column('order_json')
