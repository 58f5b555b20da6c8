"""a model's conversion notes; a rollout's history of events

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 16:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | Sequence[str] | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('notes', sa.JSON(), nullable=True))
    op.create_table(
        'deployment_events',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('deployment_id', sa.Integer(), nullable=False),
        sa.Column('at', sa.DateTime(), nullable=False),
        sa.Column('kind', sa.String(length=24), nullable=False),
        sa.Column('stage', sa.Integer(), nullable=True),
        sa.Column('device_id', sa.String(length=96), nullable=True),
        sa.Column('detail', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id']),
        sa.ForeignKeyConstraint(['device_id'], ['devices.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('deployment_events') as batch:
        batch.create_index(batch.f('ix_deployment_events_deployment_id'), ['deployment_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deployment_events') as batch:
        batch.drop_index(batch.f('ix_deployment_events_deployment_id'))
    op.drop_table('deployment_events')
    with op.batch_alter_table('models') as batch:
        batch.drop_column('notes')
