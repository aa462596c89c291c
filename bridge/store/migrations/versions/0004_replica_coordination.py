"""replica coordination: the shared dial rate, and each replica's secrets fingerprint

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "dial_slots",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("next_slot_us", sa.BigInteger, nullable=False),
    )
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("fingerprint")
    op.drop_table("dial_slots")
