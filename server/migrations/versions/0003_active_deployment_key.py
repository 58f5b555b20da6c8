"""one active deployment per group and target, enforced by the database; cancelled deployments

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 22:20:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('deployments') as batch:
        batch.add_column(sa.Column('active_key', sa.String(length=128), nullable=True))
        batch.create_unique_constraint('uq_deployments_active_key', ['active_key'])
    # rollouts already running keep their place (the newest one per group and target, should there be several)
    op.execute("""
        UPDATE deployments SET active_key = deployments."group" || '/' || (
            SELECT builds.target FROM builds WHERE builds.id = deployments.build_id)
        WHERE state = 'in_progress' AND id = (
            SELECT MAX(d2.id) FROM deployments d2 JOIN builds b2 ON b2.id = d2.build_id
            WHERE d2.state = 'in_progress' AND d2."group" = deployments."group"
              AND b2.target = (SELECT builds.target FROM builds WHERE builds.id = deployments.build_id))
    """)


def downgrade() -> None:
    with op.batch_alter_table('deployments') as batch:
        batch.drop_constraint('uq_deployments_active_key', type_='unique')
        batch.drop_column('active_key')
