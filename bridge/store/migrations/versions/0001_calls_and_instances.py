"""calls and instances

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("call_id", sa.String(64), primary_key=True),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("call_type", sa.String(16), nullable=False),
        sa.Column("call_status", sa.String(16), nullable=False),
        sa.Column("direction", sa.String(16)),
        sa.Column("from_number", sa.String(32)),
        sa.Column("to_number", sa.String(32)),
        sa.Column("registered_at", sa.BigInteger, nullable=False),
        sa.Column("start_timestamp", sa.BigInteger),
        sa.Column("end_timestamp", sa.BigInteger),
        sa.Column("sort_key", sa.BigInteger, nullable=False),
        sa.Column("instance_id", sa.String(128), nullable=False),
        sa.Column("twilio_call_sid", sa.String(64)),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("record", sa.JSON, nullable=False),
    )
    op.create_index("ix_calls_sort", "calls", ["sort_key", "call_id"])
    op.create_index("ix_calls_status_instance", "calls", ["call_status", "instance_id"])
    op.create_index("ix_calls_twilio_sid", "calls", ["twilio_call_sid"])
    op.create_table(
        "instances",
        sa.Column("instance_id", sa.String(128), primary_key=True),
        sa.Column("started_at", sa.BigInteger, nullable=False),
        sa.Column("heartbeat_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("instances")
    op.drop_table("calls")
