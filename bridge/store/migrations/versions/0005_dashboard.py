"""the dashboard: each replica's address (a listener's socket is passed to the replica relaying
the call), and an index for the call-events feed's "ended since" query

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("address", sa.String(256)))
    # (PostgreSQL: writes to calls wait while it builds, about a second per million calls; the
    # migration runs under the replicas' advisory lock, in a transaction, so not CONCURRENTLY)
    op.create_index("ix_calls_end", "calls", ["end_timestamp"])


def downgrade() -> None:
    op.drop_index("ix_calls_end", "calls")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("address")
