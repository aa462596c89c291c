"""callers and callees as long as Twilio sends them: SIP URIs and ``client:`` identities pass
the 32 characters an E.164 number needs (``sip:+14155550100@trunk.example.pstn.twilio.com``)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"

PARTY_CHARS = 256  # bridge.models.MAX_PARTY_CHARS


def upgrade() -> None:
    # (PostgreSQL widens a varchar in place, without rewriting the table; SQLite never checked)
    with op.batch_alter_table("calls") as batch:
        for column in ("from_number", "to_number"):
            batch.alter_column(column, type_=sa.String(PARTY_CHARS), existing_type=sa.String(32), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        for column in ("from_number", "to_number"):
            batch.alter_column(column, type_=sa.String(32), existing_type=sa.String(PARTY_CHARS), existing_nullable=True)
