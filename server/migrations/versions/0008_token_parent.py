"""a token's parent: the token that created it (none for a user's first and for older tokens); revoking a token
revokes the tokens it created

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 00:45:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('api_tokens') as batch:
        batch.add_column(sa.Column('parent_id', sa.Integer(), nullable=True))
        batch.create_foreign_key('fk_api_tokens_parent_id', 'api_tokens', ['parent_id'], ['id'])
        batch.create_index('ix_api_tokens_parent_id', ['parent_id'])


def downgrade() -> None:
    with op.batch_alter_table('api_tokens') as batch:
        batch.drop_index('ix_api_tokens_parent_id')
        batch.drop_constraint('fk_api_tokens_parent_id', type_='foreignkey')
        batch.drop_column('parent_id')
