"""what each device job sends over the air: the payload kind and its bytes

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 16:30:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | Sequence[str] | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('device_jobs') as batch:
        batch.add_column(sa.Column('payload', sa.String(length=48), nullable=True))
        batch.add_column(sa.Column('payload_bytes', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('device_jobs') as batch:
        batch.drop_column('payload_bytes')
        batch.drop_column('payload')
