"""a build's request (tinymlaas.build.request.BuildRequest, its options by name) replaces its constraints

The old `constraints` held budgets at its top level and the search, emulator and host options nested; the request
holds every option by its own name. Existing rows are carried over.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 16:00:00

"""
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NESTED = ("search", "host")  # the objects the old constraints nested options in


def flat(constraints: dict) -> dict:
    out = {k: v for k, v in constraints.items() if k not in NESTED and v is not None}
    for group in NESTED:
        out.update({k: v for k, v in (constraints.get(group) or {}).items() if v is not None})
    return out


def nested(request: dict) -> dict:
    search = {k: request[k] for k in ("budget", "strategy", "seed", "max_fidelity_loss") if k in request}
    host = {k: request[k] for k in ("precision", "tune_trials", "tune_minutes") if k in request}
    out = {k: request[k] for k in ("max_flash", "max_ram", "emulator") if k in request}
    return {**out, **({"search": search} if "budget" in search else {}), **({"host": host} if host else {})}


def _convert(column_from: str, column_to: str, how) -> None:
    builds = sa.table('builds', sa.column('id', sa.Integer), sa.column(column_from, sa.JSON),
                      sa.column(column_to, sa.JSON))
    conn = op.get_bind()
    for row_id, value in conn.execute(sa.select(builds.c.id, builds.c[column_from])).all():
        value = json.loads(value) if isinstance(value, str) else (value or {})
        conn.execute(builds.update().where(builds.c.id == row_id).values({column_to: how(value)}))


def upgrade() -> None:
    with op.batch_alter_table('builds') as batch:
        batch.add_column(sa.Column('request', sa.JSON(), nullable=True))
    _convert('constraints', 'request', flat)
    with op.batch_alter_table('builds') as batch:
        batch.alter_column('request', existing_type=sa.JSON(), nullable=False)
        batch.drop_column('constraints')


def downgrade() -> None:
    with op.batch_alter_table('builds') as batch:
        batch.add_column(sa.Column('constraints', sa.JSON(), nullable=True))
    _convert('request', 'constraints', nested)
    with op.batch_alter_table('builds') as batch:
        batch.alter_column('constraints', existing_type=sa.JSON(), nullable=False)
        batch.drop_column('request')
