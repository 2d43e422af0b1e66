"""FHIR search indexes: covering value lookup, index rows by resource and parameter

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 11:25:00.000000
"""
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('fhir_index', schema=None) as batch_op:
        batch_op.drop_index('ix_fhir_index_value')
        batch_op.drop_index('ix_fhir_index_resource')
        batch_op.create_index('ix_fhir_index_lookup',
                              ['tenant', 'resource_type', 'param', 'value', 'system', 'resource_pk'], unique=False)
        batch_op.create_index('ix_fhir_index_resource', ['resource_pk', 'param'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('fhir_index', schema=None) as batch_op:
        batch_op.drop_index('ix_fhir_index_resource')
        batch_op.drop_index('ix_fhir_index_lookup')
        batch_op.create_index('ix_fhir_index_resource', ['resource_pk'], unique=False)
        batch_op.create_index('ix_fhir_index_value', ['tenant', 'resource_type', 'param', 'value'], unique=False)
