"""a model's format (tflite, onnx): ONNX models build for the host targets only

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 10:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('format', sa.String(length=16), nullable=False, server_default='tflite'))


def downgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.drop_column('format')
