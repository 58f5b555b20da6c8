"""a model's validation set: held-out samples (x, y) every microcontroller build measures its accuracy on

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 10:25:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | Sequence[str] | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('validation_sha256', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('validation_samples', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.drop_column('validation_samples')
        batch.drop_column('validation_sha256')
