"""DICOM e-mail gateway: transfer jobs, outbound mails and MDNs, inbound mails, fragments, sets, quarantine

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 12:15:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inbound_fragment',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('partial_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('total', sa.Integer(), nullable=True),
    sa.Column('blob_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'partial_id', 'number', name='uq_inbound_fragment')
    )
    op.create_table('inbound_mail',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('sender', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=True),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('raw_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'message_id', name='uq_inbound_mail')
    )
    op.create_table('inbound_set',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('set_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('sender', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
    sa.Column('study_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('parts_seen', sa.Integer(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=24), nullable=False),
    sa.Column('first_seen', sa.Float(), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'sender', 'set_id', name='uq_inbound_set')
    )
    with op.batch_alter_table('inbound_set', schema=None) as batch_op:
        batch_op.create_index('ix_inbound_set_state', ['state', 'last_seen'], unique=False)

    op.create_table('outbound_mdn',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('to_address', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
    sa.Column('original_message_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('params', sa.Text(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('run_after', sa.Float(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('pk')
    )
    with op.batch_alter_table('outbound_mdn', schema=None) as batch_op:
        batch_op.create_index('ix_outbound_mdn_due', ['state', 'run_after'], unique=False)

    op.create_table('quarantine',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('raw_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('sender', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=True),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('created', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('pk')
    )
    with op.batch_alter_table('quarantine', schema=None) as batch_op:
        batch_op.create_index('ix_quarantine_tenant', ['tenant', 'created'], unique=False)

    op.create_table('transfer_job',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('job_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('study_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('selection', sa.Text(), nullable=True),
    sa.Column('recipient_endpoint', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('recipient_address', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
    sa.Column('recipient_fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('max_mail_size', sa.Integer(), nullable=True),
    sa.Column('sender_address', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
    sa.Column('set_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('sent', sa.Integer(), nullable=False),
    sa.Column('acknowledged', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('patient_name', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('study_description', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('study_date', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('task_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('updated', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('tenant', 'job_id', name='uq_transfer_job')
    )
    with op.batch_alter_table('transfer_job', schema=None) as batch_op:
        batch_op.create_index('ix_transfer_job_list', ['tenant', 'state', 'created'], unique=False)

    op.create_table('inbound_part',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('set_pk', sa.Integer(), nullable=False),
    sa.Column('set_part', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('blob_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['set_pk'], ['inbound_set.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('set_pk', 'set_part', name='uq_inbound_part')
    )
    op.create_table('outbound_mail',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('tenant', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('job_pk', sa.Integer(), nullable=False),
    sa.Column('set_part', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=24), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('run_after', sa.Float(), nullable=False),
    sa.Column('lease_until', sa.Float(), nullable=True),
    sa.Column('sent_at', sa.Float(), nullable=True),
    sa.Column('acknowledged_at', sa.Float(), nullable=True),
    sa.Column('disposition', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['job_pk'], ['transfer_job.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('job_pk', 'set_part', name='uq_outbound_mail_part'),
    sa.UniqueConstraint('message_id', name='uq_outbound_mail_message_id')
    )
    with op.batch_alter_table('outbound_mail', schema=None) as batch_op:
        batch_op.create_index('ix_outbound_mail_due', ['state', 'run_after'], unique=False)
        batch_op.create_index('ix_outbound_mail_job', ['job_pk', 'state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('outbound_mail', schema=None) as batch_op:
        batch_op.drop_index('ix_outbound_mail_job')
        batch_op.drop_index('ix_outbound_mail_due')

    op.drop_table('outbound_mail')
    op.drop_table('inbound_part')
    with op.batch_alter_table('transfer_job', schema=None) as batch_op:
        batch_op.drop_index('ix_transfer_job_list')

    op.drop_table('transfer_job')
    with op.batch_alter_table('quarantine', schema=None) as batch_op:
        batch_op.drop_index('ix_quarantine_tenant')

    op.drop_table('quarantine')
    with op.batch_alter_table('outbound_mdn', schema=None) as batch_op:
        batch_op.drop_index('ix_outbound_mdn_due')

    op.drop_table('outbound_mdn')
    with op.batch_alter_table('inbound_set', schema=None) as batch_op:
        batch_op.drop_index('ix_inbound_set_state')

    op.drop_table('inbound_set')
    op.drop_table('inbound_mail')
    op.drop_table('inbound_fragment')
