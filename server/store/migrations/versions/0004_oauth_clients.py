"""OAuth clients of the token endpoint and used client assertion ids

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 11:20:00.000000
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('oauth_client',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('client_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('scope', sa.Text(), nullable=False),
    sa.Column('secret_hash', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('jwks', sa.Text(), nullable=True),
    sa.Column('created', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('client_id', name='uq_oauth_client')
    )
    op.create_table('oauth_jti',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('client_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('jti', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('exp', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('client_id', 'jti', name='uq_oauth_jti')
    )
    with op.batch_alter_table('oauth_jti', schema=None) as batch_op:
        batch_op.create_index('ix_oauth_jti_exp', ['exp'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('oauth_jti', schema=None) as batch_op:
        batch_op.drop_index('ix_oauth_jti_exp')
    op.drop_table('oauth_jti')
    op.drop_table('oauth_client')
