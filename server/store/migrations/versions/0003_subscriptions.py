"""FHIR Subscription registry and delivery queue

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 11:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('fhir_subscription',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('subscription_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('criteria_type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('criteria', sa.Text(), nullable=False),
    sa.Column('endpoint', sa.Text(), nullable=False),
    sa.Column('payload', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('headers', sa.Text(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'subscription_id', name='uq_fhir_subscription')
    )
    with op.batch_alter_table('fhir_subscription', schema=None) as batch_op:
        batch_op.create_index('ix_fhir_subscription_type', ['tenant', 'criteria_type', 'status'], unique=False)

    op.create_table('fhir_subscription_delivery',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('subscription_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('resource_type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('resource_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('run_after', sa.Float(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('pk')
    )
    with op.batch_alter_table('fhir_subscription_delivery', schema=None) as batch_op:
        batch_op.create_index('ix_fhir_subscription_delivery_due', ['state', 'run_after'], unique=False)
        batch_op.create_index('ix_fhir_subscription_delivery_subscription', ['tenant', 'subscription_id', 'state'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('fhir_subscription_delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_fhir_subscription_delivery_subscription')
        batch_op.drop_index('ix_fhir_subscription_delivery_due')
    op.drop_table('fhir_subscription_delivery')
    with op.batch_alter_table('fhir_subscription', schema=None) as batch_op:
        batch_op.drop_index('ix_fhir_subscription_type')
    op.drop_table('fhir_subscription')
