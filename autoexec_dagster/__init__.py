"""autoexec_dagster: an autonomous execution layer for Dagster.

Model outputs become completed, recorded work: a playbook routes each flagged entity to an
action, a person or a holdout; channels execute the actions; the action ledger records all of it.
"""

from autoexec_dagster.approvals.links import ApprovalLinks
from autoexec_dagster.backtest import BacktestReport, backtest
from autoexec_dagster.budgets import Budget
from autoexec_dagster.channels.base import ActionRequest, Channel, Delivered, Sender
from autoexec_dagster.channels.email import EmailChannel
from autoexec_dagster.channels.python import PythonChannel
from autoexec_dagster.channels.sql import SqlChannel
from autoexec_dagster.channels.sql_query import SqlQueryChannel
from autoexec_dagster.channels.webhook import WebhookChannel, verify_signature
from autoexec_dagster.components.execution_component import ExecutionComponent
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from autoexec_dagster.dagster.execution_assets import ExecuteFn
from autoexec_dagster.dagster.insight_sensor import flagged_metadata
from autoexec_dagster.errors import (
    ApprovalError,
    AutoexecError,
    ChannelConfigError,
    ChannelError,
    EscalationError,
    ExperimentError,
    InsightValidationError,
    LedgerError,
    PermanentChannelError,
    PlanError,
    PlaybookError,
    TransientChannelError,
)
from autoexec_dagster.executor.escalation_actions import (
    deliver_approved_escalations,
    deliver_approved_escalations_async,
)
from autoexec_dagster.executor.plan_execution import Progress, execute_plan, execute_plan_async
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.experiments.experiment import Experiment, PromoteWhen
from autoexec_dagster.experiments.outcome_metric import OutcomeMetric
from autoexec_dagster.experiments.update import (
    ExperimentResult,
    record_outcomes,
    update_experiment,
)
from autoexec_dagster.experiments.uplift import uplift
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Guardrails, Playbook, Rule
from autoexec_dagster.routing import route, validate_insight
from autoexec_dagster.version import __version__
from autoexec_dagster.workflows.advance import (
    WorkflowReport,
    advance_workflows,
    advance_workflows_async,
)
from autoexec_dagster.workflows.workflow import Step, Workflow

__all__ = [
    "ActionLedger",
    "ActionRequest",
    "ApprovalError",
    "ApprovalLinks",
    "AutoexecError",
    "BacktestReport",
    "Budget",
    "Channel",
    "ChannelConfigError",
    "ChannelError",
    "Delivered",
    "EmailChannel",
    "EscalationError",
    "ExecuteFn",
    "ExecutionComponent",
    "ExecutionReport",
    "Experiment",
    "ExperimentError",
    "ExperimentResult",
    "Guardrails",
    "InsightValidationError",
    "LedgerError",
    "OutcomeMetric",
    "PermanentChannelError",
    "PlanError",
    "Playbook",
    "PlaybookError",
    "Progress",
    "PromoteWhen",
    "PythonChannel",
    "Rule",
    "Sender",
    "SqlChannel",
    "SqlQueryChannel",
    "Step",
    "TransientChannelError",
    "WebhookChannel",
    "Workflow",
    "WorkflowReport",
    "__version__",
    "advance_workflows",
    "advance_workflows_async",
    "backtest",
    "build_execution_defs",
    "deliver_approved_escalations",
    "deliver_approved_escalations_async",
    "execute_plan",
    "execute_plan_async",
    "flagged_metadata",
    "record_outcomes",
    "route",
    "update_experiment",
    "uplift",
    "validate_insight",
    "verify_signature",
]
