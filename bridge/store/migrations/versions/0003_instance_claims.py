"""instance claims: which process holds an instance id, under a lease

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("claim", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("claim")
