"""DICOM e-mail gateway: transfer jobs caused by a teleconsult order (ServiceRequest) and its send options

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 14:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('transfer_job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('order_ref', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('order_task', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('send_options', sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column('note', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('order_json', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('deid_secret', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('deid_options', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('report_blob', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('transfer_job', schema=None) as batch_op:
        for name in ('report_blob', 'deid_options', 'deid_secret', 'order_json', 'note', 'send_options', 'order_task',
                     'order_ref'):
            batch_op.drop_column(name)
