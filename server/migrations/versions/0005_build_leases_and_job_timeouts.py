"""build leases (the worker running a build and until when its claim holds); per-deployment job timeouts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 10:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('builds') as batch:
        batch.add_column(sa.Column('lease_owner', sa.String(length=96), nullable=True))
        batch.add_column(sa.Column('lease_expires_at', sa.DateTime(), nullable=True))
    with op.batch_alter_table('deployments') as batch:
        batch.add_column(sa.Column('job_timeout', sa.Integer(), nullable=False, server_default='1800'))


def downgrade() -> None:
    with op.batch_alter_table('deployments') as batch:
        batch.drop_column('job_timeout')
    with op.batch_alter_table('builds') as batch:
        batch.drop_column('lease_expires_at')
        batch.drop_column('lease_owner')
