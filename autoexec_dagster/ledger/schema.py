"""Tables of the action ledger and its schema version.

The schema is versioned in ``autoexec_schema_version`` so a release can migrate a ledger in place
(see :mod:`autoexec_dagster.ledger.migrations`).

Version 2: idempotency keys no longer include the playbook version; the outbox keeps each pending
action's request data (``payload``) and each reply's bounded ``output``; rule escalations carry a
``dedupe_key`` with at most one open escalation per key; workflow instances have their own
table, and their step attempts are actions that name their ``instance_id`` and ``step``.
"""

import sqlalchemy as sa

SCHEMA_VERSION = 2
OPEN = "open"
RESOLVED = "resolved"

# Action states. An action is reserved before its side effect and completed after it; a crash
# leaves it in ``sending`` until recovery marks it ``in_doubt``.
RESERVED = "reserved"
SENDING = "sending"
SUCCEEDED = "succeeded"
FAILED = "failed"
IN_DOUBT = "in_doubt"
ESCALATED = "escalated"
HELD_OUT = "held_out"
SKIPPED = "skipped"
DRY_RUN = "dry_run"
# The entity was handed to a workflow instance (autoexec_workflow_instances); its steps are actions.
WORKFLOW = "workflow"
STATES: tuple[str, ...] = (
    RESERVED,
    SENDING,
    SUCCEEDED,
    FAILED,
    IN_DOUBT,
    ESCALATED,
    HELD_OUT,
    SKIPPED,
    DRY_RUN,
    WORKFLOW,
)
FINAL_STATES: frozenset[str] = frozenset(
    {SUCCEEDED, FAILED, ESCALATED, HELD_OUT, SKIPPED, DRY_RUN, WORKFLOW}
)

# Workflow instance states. Running and waiting instances have a next_due; failing ones run their
# on_failure_steps before the escalation; the rest are final.
RUNNING = "running"
WAITING = "waiting"
FAILING = "failing"
CANCELLED = "cancelled"
ACTIVE_INSTANCE_STATES: tuple[str, ...] = (RUNNING, WAITING, FAILING)
INSTANCE_STATES: tuple[str, ...] = (*ACTIVE_INSTANCE_STATES, SUCCEEDED, FAILED, CANCELLED)

metadata = sa.MetaData()

schema_version = sa.Table(
    "autoexec_schema_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("migrated_at", sa.DateTime(timezone=True), nullable=False),
)

actions = sa.Table(
    "autoexec_actions",
    metadata,
    sa.Column("idempotency_key", sa.String(80), primary_key=True),
    sa.Column("playbook", sa.String(100), nullable=False),
    sa.Column("playbook_version", sa.String(100), nullable=False),
    sa.Column("insight", sa.String(300), nullable=False),
    sa.Column("partition_key", sa.String(200), nullable=False),
    sa.Column("entity_id", sa.String(300), nullable=False),
    sa.Column("rule", sa.String(100), nullable=False),
    sa.Column("action", sa.String(100)),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("delivery", sa.String(16), nullable=False, server_default="at_least_once"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("run_id", sa.String(64)),
    sa.Column("worker", sa.String(200)),
    # Epoch seconds: compared on every claim and recovery, cheaper and portable as a float.
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("request_digest", sa.String(64)),
    # The request's entity data (JSON) while the action is pending; cleared once it is final.
    sa.Column("payload", sa.Text),
    # The reply's bounded JSON output, for later workflow steps.
    sa.Column("output", sa.Text),
    # For workflow step attempts: the instance and the step.
    sa.Column("instance_id", sa.String(80)),
    sa.Column("step", sa.String(100)),
    sa.Column("detail", sa.String(500)),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Index("ix_autoexec_actions_partition", "playbook", "partition_key"),
    sa.Index("ix_autoexec_actions_state", "state"),
    sa.Index("ix_autoexec_actions_worker", "worker"),
    sa.Index("ix_autoexec_actions_entity", "playbook", "entity_id"),
    sa.Index("ix_autoexec_actions_instance", "instance_id"),
)

_ACTIVE = "state IN ('running', 'waiting', 'failing')"

workflow_instances = sa.Table(
    "autoexec_workflow_instances",
    metadata,
    # The idempotency key of the decision that started it: one instance per entity, partition and
    # workflow, however often the partition is re-run.
    sa.Column("instance_id", sa.String(80), primary_key=True),
    sa.Column("playbook", sa.String(100), nullable=False),
    sa.Column("playbook_version", sa.String(100), nullable=False),
    sa.Column("workflow", sa.String(100), nullable=False),
    sa.Column("insight", sa.String(300), nullable=False),
    sa.Column("partition_key", sa.String(200), nullable=False),
    sa.Column("entity_id", sa.String(300), nullable=False),
    sa.Column("rule", sa.String(100), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    # The step the instance is at (None once finished) and its position; failing instances are
    # at a step of on_failure_steps.
    sa.Column("step", sa.String(100)),
    sa.Column("step_index", sa.Integer, nullable=False, server_default="0"),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("step_started_at", sa.DateTime(timezone=True)),
    sa.Column("next_due", sa.DateTime(timezone=True)),
    # JSON: {step: output} and the list of step outcomes (the evidence of a failure).
    sa.Column("outputs", sa.Text, nullable=False, server_default="{}"),
    sa.Column("log", sa.Text, nullable=False, server_default="[]"),
    # The entity's insight columns (JSON), which conditions and templates read.
    sa.Column("data", sa.Text, nullable=False, server_default="{}"),
    sa.Column("error", sa.Text),
    sa.Column("worker", sa.String(200)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("run_id", sa.String(64)),
    sa.Column("cancelled_by", sa.String(200)),
    sa.Column("cancel_reason", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    # The due-work query: active instances only, so finished ones are never scanned.
    sa.Index(
        "ix_autoexec_workflow_due",
        "playbook",
        "next_due",
        sqlite_where=sa.text(_ACTIVE),
        postgresql_where=sa.text(_ACTIVE),
    ),
    sa.Index("ix_autoexec_workflow_partition", "playbook", "partition_key", "state"),
    sa.Index("ix_autoexec_workflow_entity", "playbook", "entity_id"),
)

escalations = sa.Table(
    "autoexec_escalations",
    metadata,
    sa.Column("idempotency_key", sa.String(80), primary_key=True),
    sa.Column("playbook", sa.String(100), nullable=False),
    sa.Column("playbook_version", sa.String(100), nullable=False),
    sa.Column("insight", sa.String(300), nullable=False),
    sa.Column("partition_key", sa.String(200), nullable=False),
    sa.Column("entity_id", sa.String(300), nullable=False),
    sa.Column("rule", sa.String(100), nullable=False),
    # rule, guardrail, delivery_failed, circuit_open, in_doubt
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=False, server_default="{}"),
    sa.Column("status", sa.String(16), nullable=False, server_default="open"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("resolved_at", sa.DateTime(timezone=True)),
    sa.Column("resolved_by", sa.String(200)),
    sa.Column("resolution", sa.Text),
    # Rule escalations: one case per (playbook, rule, entity) while it is open; else the key.
    sa.Column("dedupe_key", sa.String(80)),
    sa.Index("ix_autoexec_escalations_partition", "playbook", "partition_key", "status"),
    sa.Index(
        "ux_autoexec_escalations_open_case",
        "dedupe_key",
        unique=True,
        sqlite_where=sa.text("status = 'open'"),
        postgresql_where=sa.text("status = 'open'"),
    ),
)

# Rows that version 1 keyed apart only by playbook version: one survives under each new key, the
# others are kept here so the migration loses no record of what was sent.
superseded_actions = sa.Table(
    "autoexec_actions_superseded",
    metadata,
    sa.Column("old_key", sa.String(80), primary_key=True),
    sa.Column("idempotency_key", sa.String(80), nullable=False, index=True),
    sa.Column("playbook", sa.String(100), nullable=False),
    sa.Column("playbook_version", sa.String(100), nullable=False),
    sa.Column("partition_key", sa.String(200), nullable=False),
    sa.Column("entity_id", sa.String(300), nullable=False),
    sa.Column("action", sa.String(100)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("migrated_at", sa.DateTime(timezone=True), nullable=False),
)

controls = sa.Table(
    "autoexec_controls",
    metadata,
    # "*" pauses every playbook; otherwise a playbook name.
    sa.Column("scope", sa.String(100), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("updated_by", sa.String(200)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
