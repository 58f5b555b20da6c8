"""the build whose firmware image a device's active slot holds (after a model-only update: not the build it runs)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 19:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | Sequence[str] | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('image_build_id', sa.Integer(), nullable=True))
        batch.create_foreign_key('fk_devices_image_build', 'builds', ['image_build_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('devices') as batch:
        batch.drop_constraint('fk_devices_image_build', type_='foreignkey')
        batch.drop_column('image_build_id')
