"""organisations (tenants), user roles, API tokens with scopes, expiry and revocation

Existing users, devices, models, builds and deployments move into one organisation, `default`; each user
becomes its admin and keeps its token (now a row of api_tokens with every scope, no expiry).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 01:00:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNED = ('devices', 'models', 'builds', 'deployments')


def upgrade() -> None:
    op.create_table('organizations',
                    sa.Column('id', sa.Integer(), nullable=False),
                    sa.Column('name', sa.String(length=64), nullable=False),
                    sa.Column('created_at', sa.DateTime(), nullable=False),
                    sa.PrimaryKeyConstraint('id'),
                    sa.UniqueConstraint('name'))
    op.create_table('api_tokens',
                    sa.Column('id', sa.Integer(), nullable=False),
                    sa.Column('user_id', sa.Integer(), nullable=False),
                    sa.Column('name', sa.String(length=64), nullable=False),
                    sa.Column('token_hash', sa.String(length=64), nullable=False),
                    sa.Column('scopes', sa.JSON(), nullable=False),
                    sa.Column('expires_at', sa.DateTime(), nullable=True),
                    sa.Column('revoked_at', sa.DateTime(), nullable=True),
                    sa.Column('last_used_at', sa.DateTime(), nullable=True),
                    sa.Column('created_at', sa.DateTime(), nullable=False),
                    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name='fk_api_tokens_user'),
                    sa.PrimaryKeyConstraint('id'),
                    sa.UniqueConstraint('token_hash'))
    op.create_index('ix_api_tokens_user_id', 'api_tokens', ['user_id'])

    has_users = op.get_bind().execute(sa.text('SELECT COUNT(*) FROM users')).scalar()
    if has_users:
        op.execute("INSERT INTO organizations (id, name, created_at) VALUES (1, 'default', CURRENT_TIMESTAMP)")
        op.execute("""INSERT INTO api_tokens (user_id, name, token_hash, scopes, created_at)
                      SELECT id, 'initial', token_hash, '["read", "build", "deploy", "admin"]', created_at FROM users""")

    with op.batch_alter_table('users') as batch:
        batch.add_column(sa.Column('org_id', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('role', sa.String(length=16), nullable=True))
    op.execute("UPDATE users SET org_id = 1, role = 'admin'")
    with op.batch_alter_table('users') as batch:
        batch.alter_column('org_id', nullable=False)
        batch.alter_column('role', nullable=False)
        batch.create_foreign_key('fk_users_org', 'organizations', ['org_id'], ['id'])
        batch.create_index('ix_users_org_id', ['org_id'])
        batch.drop_column('token_hash')

    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('org_id', sa.Integer(), nullable=True))
        op.execute(f"UPDATE {table} SET org_id = (SELECT users.org_id FROM users WHERE users.id = {table}.owner_id)")
        with op.batch_alter_table(table) as batch:
            batch.alter_column('org_id', nullable=False)
            batch.create_foreign_key(f'fk_{table}_org', 'organizations', ['org_id'], ['id'])
            batch.create_index(f'ix_{table}_org_id', ['org_id'])
    # one rollout at a time per organisation, group and target
    op.execute("UPDATE deployments SET active_key = org_id || '/' || active_key WHERE active_key IS NOT NULL")


def downgrade() -> None:
    op.execute("UPDATE deployments SET active_key = substr(active_key, instr(active_key, '/') + 1) "
               "WHERE active_key IS NOT NULL")
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f'ix_{table}_org_id')
            batch.drop_constraint(f'fk_{table}_org', type_='foreignkey')
            batch.drop_column('org_id')
    with op.batch_alter_table('users') as batch:
        batch.add_column(sa.Column('token_hash', sa.String(length=64), nullable=True))
    op.execute("UPDATE users SET token_hash = (SELECT MIN(token_hash) FROM api_tokens "
               "WHERE api_tokens.user_id = users.id AND api_tokens.revoked_at IS NULL)")
    op.execute("UPDATE users SET token_hash = 'revoked-' || id WHERE token_hash IS NULL")
    with op.batch_alter_table('users') as batch:
        batch.alter_column('token_hash', nullable=False)
        batch.create_unique_constraint('uq_users_token_hash', ['token_hash'])
        batch.drop_index('ix_users_org_id')
        batch.drop_constraint('fk_users_org', type_='foreignkey')
        batch.drop_column('role')
        batch.drop_column('org_id')
    op.drop_index('ix_api_tokens_user_id', 'api_tokens')
    op.drop_table('api_tokens')
    op.drop_table('organizations')
