"""webhook outbox

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("call_id", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("payload", sa.JSON),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger),
        sa.Column("leased_by", sa.String(128)),
        sa.Column("delivered_at", sa.BigInteger),
        sa.Column("last_error", sa.String(500)),
    )
    op.create_index("ix_outbox_due", "webhook_outbox", ["next_attempt_at"])
    op.create_index("ix_outbox_call", "webhook_outbox", ["call_id", "id"])


def downgrade() -> None:
    op.drop_table("webhook_outbox")
