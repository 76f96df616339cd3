"""blob reference counts, version tombstones, per-version sharing, tenant suspension, key last use

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("refcount", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    )
    # Every stored version refers to two blobs: count what exists today.
    op.execute(
        "INSERT INTO blobs (digest, refcount, updated_at) "
        "SELECT digest, COUNT(*), CURRENT_TIMESTAMP FROM ("
        " SELECT weights_sha256 AS digest FROM adapter_versions"
        " UNION ALL SELECT config_sha256 AS digest FROM adapter_versions) AS refs GROUP BY digest"
    )
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("public", sa.Boolean(), nullable=False, server_default=sa.false()))
    # An adapter shared as a whole keeps its existing versions shared; later uploads start private.
    op.execute(
        "UPDATE adapter_versions SET public = "
        "(SELECT adapters.public FROM adapters WHERE adapters.id = adapter_versions.adapter_id)"
    )
    with op.batch_alter_table("adapter_versions") as batch:
        batch.alter_column("public", server_default=None)
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("public")
        batch.add_column(sa.Column("last_version", sa.Integer(), nullable=False, server_default="0"))
    op.execute("UPDATE adapters SET last_version = COALESCE("
               "(SELECT MAX(v.version) FROM adapter_versions v WHERE v.adapter_id = adapters.id), 0)")
    with op.batch_alter_table("adapters") as batch:
        batch.alter_column("last_version", server_default=None)
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("suspended_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("last_used_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("last_used_at")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("suspended_at")
    op.execute("DELETE FROM adapters WHERE NOT EXISTS "
               "(SELECT 1 FROM adapter_versions v WHERE v.adapter_id = adapters.id)")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("last_version")
        batch.add_column(sa.Column("public", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(
        "UPDATE adapters SET public = EXISTS (SELECT 1 FROM adapter_versions v "
        "WHERE v.adapter_id = adapters.id AND v.public)"
    )
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("public")
    op.drop_table("blobs")
