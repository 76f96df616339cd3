"""quantization jobs, base model lineage and quality report

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 20:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("base_models") as batch:  # batch: SQLite cannot add a foreign key in place
        batch.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("report", sa.JSON(), nullable=True))
        batch.create_foreign_key("fk_base_models_parent", "base_models", ["parent_id"], ["id"])
    op.create_table(
        "quantization_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("source_id", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=True),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("runner", sa.String(length=128), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("log_tail", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["source_id"], ["base_models.id"]),
        sa.ForeignKeyConstraint(["result_id"], ["base_models.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_quantization_jobs_state", "quantization_jobs", ["state"])


def downgrade() -> None:
    op.drop_index("ix_quantization_jobs_state", table_name="quantization_jobs")
    op.drop_table("quantization_jobs")
    with op.batch_alter_table("base_models") as batch:
        batch.drop_constraint("fk_base_models_parent", type_="foreignkey")
        batch.drop_column("report")
        batch.drop_column("parent_id")
