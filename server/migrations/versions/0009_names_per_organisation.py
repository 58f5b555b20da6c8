"""device and user names are unique within an organisation, not across the service (a name another tenant took
was answered 409: an existence oracle). A device's key (its MQTT user name) becomes `<org id>.<name>` for new
devices; devices registered before keep their name as key, so their credentials go on working.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 09:40:00

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | Sequence[str] | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite's unnamed UNIQUE(name) of users gets this name when a batch reflects the table; PostgreSQL named it itself
UNNAMED = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
KEY_COLUMNS = (('devices', 'id'), ('device_jobs', 'device_id'), ('telemetry', 'device_id'),
               ('measurements', 'device_id'))


def _global_user_names() -> str:
    return 'users_name_key' if op.get_bind().dialect.name == 'postgresql' else 'uq_users_name'


def upgrade() -> None:
    with op.batch_alter_table('users', naming_convention=UNNAMED) as batch:
        batch.drop_constraint(_global_user_names(), type_='unique')
        batch.create_unique_constraint('uq_users_org_name', ['org_id', 'name'])
    for table, column in KEY_COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, type_=sa.String(length=96), existing_type=sa.String(length=64))
    with op.batch_alter_table('devices') as batch:
        batch.add_column(sa.Column('name', sa.String(length=64), nullable=True))
    op.execute("UPDATE devices SET name = id")
    with op.batch_alter_table('devices') as batch:
        batch.alter_column('name', nullable=False, existing_type=sa.String(length=64))
        batch.create_unique_constraint('uq_devices_org_name', ['org_id', 'name'])


def downgrade() -> None:
    # only a database without two devices (or users) of one name in different organisations goes back
    with op.batch_alter_table('devices') as batch:
        batch.drop_constraint('uq_devices_org_name', type_='unique')
        batch.drop_column('name')
    for table, column in KEY_COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, type_=sa.String(length=64), existing_type=sa.String(length=96))
    with op.batch_alter_table('users') as batch:
        batch.drop_constraint('uq_users_org_name', type_='unique')
        batch.create_unique_constraint(_global_user_names(), ['name'])
