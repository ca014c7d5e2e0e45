"""Tables of the action ledger and its schema version.

The schema is versioned in ``autoexec_schema_version`` so a release can migrate a ledger in place
(see :mod:`autoexec_dagster.ledger.migrations`).

Version 2: idempotency keys no longer include the playbook version; the outbox keeps each pending
action's request data (``payload``) and each reply's bounded ``output``; rule escalations carry a
``dedupe_key`` with at most one open escalation per key; workflow instances have their own
table, and their step attempts are actions that name their ``instance_id`` and ``step``.

Version 3: approval requests of workflow approval steps and each approver's decision; an
escalation may carry a proposed action and records how it was decided; suppressions keep an
entity out of a playbook's actions and escalations for a while.

Version 4: experiments (their state and weights, each period's weights, every decision with its
evidence), sticky variant assignments, the exposures outcomes are joined to (treated, variant or
held out, by the ledger's clock), the outcomes themselves, and the variant on each action.
"""

import sqlalchemy as sa

SCHEMA_VERSION = 5
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
# A person (or an approval's expiry) rejected what the instance was about to do.
REJECTED = "rejected"
ACTIVE_INSTANCE_STATES: tuple[str, ...] = (RUNNING, WAITING, FAILING)
INSTANCE_STATES: tuple[str, ...] = (
    *ACTIVE_INSTANCE_STATES,
    SUCCEEDED,
    FAILED,
    REJECTED,
    CANCELLED,
)

# Approval request states. A request is pending until enough listed approvers approve it, one
# rejects it, it expires, or the payload it approves changes (void); a decided request is
# ``applied`` once the workflow has moved on because of it.
PENDING = "pending"
APPROVED = "approved"
EXPIRED = "expired"
VOID = "void"
APPROVAL_STATES: tuple[str, ...] = (PENDING, APPROVED, REJECTED, EXPIRED, VOID)

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
    # The experiment variant whose channel overrides this action was sent with.
    sa.Column("variant", sa.String(100)),
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
    # The action a person may approve for the entity (``Rule(escalate=..., action=...)``).
    sa.Column("proposed_action", sa.String(100)),
    # How the case was decided: cli, link, python.
    sa.Column("decided_via", sa.String(32)),
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

_WAKE = "applied_at IS NULL AND status IN ('approved', 'rejected')"

approvals = sa.Table(
    "autoexec_approvals",
    metadata,
    # hash(instance, step, payload digest): a changed payload is a new request.
    sa.Column("approval_id", sa.String(80), primary_key=True),
    sa.Column("instance_id", sa.String(80), nullable=False),
    sa.Column("playbook", sa.String(100), nullable=False),
    sa.Column("playbook_version", sa.String(100), nullable=False),
    sa.Column("workflow", sa.String(100), nullable=False),
    sa.Column("insight", sa.String(300), nullable=False),
    sa.Column("partition_key", sa.String(200), nullable=False),
    sa.Column("entity_id", sa.String(300), nullable=False),
    sa.Column("rule", sa.String(100), nullable=False),
    sa.Column("step", sa.String(100), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    # JSON list of the people who may decide, and how many distinct approvals are needed.
    sa.Column("approvers", sa.Text, nullable=False),
    sa.Column("min_approvals", sa.Integer, nullable=False, server_default="1"),
    # What the following steps will do (JSON) and its SHA-256: decisions bind to the digest.
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    # The request's value (e.g. the purchase order's total), for sums and sorting.
    sa.Column("value", sa.Float),
    sa.Column("condition", sa.Text),
    sa.Column("on_expiry", sa.String(16), nullable=False),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sla_due_at", sa.DateTime(timezone=True)),
    sa.Column("decided_at", sa.DateTime(timezone=True)),
    # Who decided (comma-separated when several approvals were needed), how and the note.
    sa.Column("decided_by", sa.Text),
    sa.Column("decided_via", sa.String(32)),
    sa.Column("decision_note", sa.Text),
    sa.Column("applied_at", sa.DateTime(timezone=True)),
    sa.Column("run_id", sa.String(64)),
    sa.Index("ix_autoexec_approvals_partition", "playbook", "partition_key", "status"),
    sa.Index("ix_autoexec_approvals_instance", "instance_id", "step"),
    # Decisions the workflow has not applied yet: what wakes a waiting instance.
    sa.Index(
        "ix_autoexec_approvals_wake",
        "playbook",
        "partition_key",
        sqlite_where=sa.text(_WAKE),
        postgresql_where=sa.text(_WAKE),
    ),
)

approval_decisions = sa.Table(
    "autoexec_approval_decisions",
    metadata,
    # One decision per approver and request: a reused link or a second click decides nothing.
    sa.Column("approval_id", sa.String(80), primary_key=True),
    sa.Column("approver", sa.String(200), primary_key=True),
    # approve or reject
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("note", sa.Text),
    # cli, link, python
    sa.Column("via", sa.String(32), nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
)

suppressions = sa.Table(
    "autoexec_suppressions",
    metadata,
    sa.Column("playbook", sa.String(100), primary_key=True),
    sa.Column("entity_id", sa.String(300), primary_key=True),
    # No action and no new escalation for the entity in the playbook before this time.
    sa.Column("until", sa.DateTime(timezone=True), nullable=False),
    sa.Column("suppressed_by", sa.String(200), nullable=False),
    sa.Column("note", sa.Text),
    sa.Column("via", sa.String(32)),
    sa.Column("escalation_key", sa.String(80)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# Experiment states: running until a variant is promoted (or awaiting a person's approval of the
# promotion), or stopped when every variant crossed a guardrail.
RUNNING_EXPERIMENT = "running"
AWAITING_APPROVAL = "awaiting_approval"
PROMOTED = "promoted"
STOPPED = "stopped"
# Variant states.
LIVE = "live"
ARCHIVED = "archived"
# Exposure arms besides the variants: an action without an experiment, and the holdout.
TREATED = "treated"
HOLDOUT = "holdout"

experiments = sa.Table(
    "autoexec_experiments",
    metadata,
    sa.Column("playbook", sa.String(100), primary_key=True),
    sa.Column("experiment", sa.String(100), primary_key=True),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("rule", sa.String(100), nullable=False),
    # Of the variants and control: they may not change while the experiment runs.
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("control", sa.String(100), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("winner", sa.String(100)),
    # JSON: variant -> weight in force, and variant -> live | promoted | archived | stopped.
    sa.Column("weights", sa.Text, nullable=False),
    sa.Column("weights_reason", sa.Text),
    sa.Column("variant_status", sa.Text, nullable=False),
    # Bumped on every update, so two concurrent updates cannot both apply.
    sa.Column("revision", sa.Integer, nullable=False, server_default="0"),
    sa.Column("approval_id", sa.String(80)),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True)),
    sa.Index("ix_autoexec_experiments_action", "playbook", "action", "status"),
)

experiment_assignments = sa.Table(
    "autoexec_experiment_assignments",
    metadata,
    # One variant per entity for the experiment's life: the primary key makes it sticky.
    sa.Column("playbook", sa.String(100), primary_key=True),
    sa.Column("experiment", sa.String(100), primary_key=True),
    sa.Column("entity_id", sa.String(300), primary_key=True),
    sa.Column("variant", sa.String(100), nullable=False),
    # The partition (period) the entity was first assigned in, under that period's weights.
    sa.Column("period", sa.String(200), nullable=False),
    sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_autoexec_assignments_period", "playbook", "experiment", "period"),
)

experiment_periods = sa.Table(
    "autoexec_experiment_periods",
    metadata,
    # The weights new assignments of a period were drawn with (the sample-ratio check's design).
    sa.Column("playbook", sa.String(100), primary_key=True),
    sa.Column("experiment", sa.String(100), primary_key=True),
    sa.Column("period", sa.String(200), primary_key=True),
    sa.Column("weights", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

experiment_events = sa.Table(
    "autoexec_experiment_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("playbook", sa.String(100), nullable=False),
    sa.Column("experiment", sa.String(100), nullable=False),
    # started, weights, promoted, archived, stopped, approval_requested, ...
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("variant", sa.String(100)),
    sa.Column("detail", sa.Text, nullable=False),
    # JSON: the figures the decision was taken on.
    sa.Column("evidence", sa.Text, nullable=False, server_default="{}"),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_autoexec_experiment_events", "playbook", "experiment", "id"),
)

exposures = sa.Table(
    "autoexec_exposures",
    metadata,
    # One per entity, action and partition: outcomes are joined to it within a window.
    sa.Column("playbook", sa.String(100), primary_key=True),
    sa.Column("action", sa.String(100), primary_key=True),
    sa.Column("entity_id", sa.String(300), primary_key=True),
    sa.Column("partition_key", sa.String(200), primary_key=True),
    # A variant, "treated" (no experiment) or "holdout".
    sa.Column("arm", sa.String(100), nullable=False),
    # The experiment the exposure counts in ("" when none, or after the experiment decided).
    sa.Column("experiment", sa.String(100), nullable=False, server_default=""),
    sa.Column("exposed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("idempotency_key", sa.String(80), nullable=False),
    sa.Index("ix_autoexec_exposures_experiment", "playbook", "experiment"),
)

outcomes = sa.Table(
    "autoexec_outcomes",
    metadata,
    sa.Column("playbook", sa.String(100), primary_key=True),
    sa.Column("entity_id", sa.String(300), primary_key=True),
    sa.Column("occurred_at", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("metric", sa.String(100), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

# Budgets (issue 10): what each budget has spent, per scope (an entity, or a playbook), shared by
# every playbook and worker that records into this ledger.
budget_spend = sa.Table(
    "autoexec_budget_spend",
    metadata,
    sa.Column("budget", sa.String(100), primary_key=True),
    # The action's key: a re-run of the same action never spends twice.
    sa.Column("idempotency_key", sa.String(80), primary_key=True),
    # The entity id (per-entity budgets) or the playbook (per-playbook budgets).
    sa.Column("scope", sa.String(300), nullable=False),
    sa.Column("playbook", sa.String(100), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("spent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_autoexec_budget_spend_scope", "budget", "scope", "spent_at"),
)

# One row per (budget, scope) that has ever spent: the row a PostgreSQL writer locks (FOR UPDATE)
# before it counts the scope's spend, so two workers cannot both take the last unit.
budget_locks = sa.Table(
    "autoexec_budget_locks",
    metadata,
    sa.Column("budget", sa.String(100), primary_key=True),
    sa.Column("scope", sa.String(300), primary_key=True),
)
