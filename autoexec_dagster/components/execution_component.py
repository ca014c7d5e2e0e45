"""``ExecutionComponent``: the execution layer from a ``defs.yaml``, over ``build_execution_defs``.

::

    # defs/churn_execution/defs.yaml
    type: autoexec_dagster.ExecutionComponent
    attributes:
      insight: churn_scores
      playbook: churn_playbook.yaml          # relative to this folder, or an inline mapping
      partitions: {type: daily, start_date: "2026-11-01"}
      ledger_url: "{{ env.AUTOEXEC_LEDGER_URL }}"
      channels:
        retention_email:
          type: email
          host: smtp.example.com
          sender: "Retention <retention@example.com>"
          to_column: email
          subject: "We miss you, {{ name }}"     # channel templates are kept as written
          template: "..."
          password: {env: SMTP_PASSWORD}     # a dg.EnvVar: resolved in the run, never stored
        crm_task:
          type: webhook
          url: https://crm.example.com/tasks
          secret: {env: CRM_WEBHOOK_SECRET}

A channel's ``type`` is ``email``, ``webhook``, ``sql``, ``python`` or the import path of a
:class:`~autoexec_dagster.channels.base.Channel` subclass (``"package.module:Class"``); the other
keys are that channel's fields. Subclass the component and override :meth:`execute` to customise
how a routed plan is executed, as with dagster-dbt's ``DbtProjectComponent.execute``.
"""

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import dagster as dg
import pandas as pd
from pydantic import Field, ValidationError

from autoexec_dagster.channels.base import Channel
from autoexec_dagster.dagster.defs_factory import build_execution_defs
from autoexec_dagster.dagster.execution_assets import default_execute
from autoexec_dagster.dagster.insight_sensor import FLAGGED_METADATA_KEY
from autoexec_dagster.errors import ChannelConfigError
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.executor.sharding import MAX_SHARDS
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Playbook

CHANNEL_TYPES: dict[str, str] = {
    "email": "autoexec_dagster.channels.email:EmailChannel",
    "webhook": "autoexec_dagster.channels.webhook:WebhookChannel",
    "sql": "autoexec_dagster.channels.sql:SqlChannel",
    "sql_query": "autoexec_dagster.channels.sql_query:SqlQueryChannel",
    "python": "autoexec_dagster.channels.python:PythonChannel",
}

_TIME_WINDOWS = {
    "hourly": dg.HourlyPartitionsDefinition,
    "daily": dg.DailyPartitionsDefinition,
    "weekly": dg.WeeklyPartitionsDefinition,
    "monthly": dg.MonthlyPartitionsDefinition,
}


class PartitionsModel(dg.Model, dg.Resolvable):
    """The insight's partitions, as YAML: a time window from a start date, or static keys."""

    type: Literal["hourly", "daily", "weekly", "monthly", "static"] = Field(
        description="Kind of partitions of the insight asset."
    )
    start_date: str | None = Field(
        default=None, description="First partition of a time window, e.g. '2026-11-01'."
    )
    end_offset: int = Field(default=0, description="Extra partitions past the current window.")
    timezone: str | None = Field(default=None, description="Timezone of a time window.")
    keys: list[str] | None = Field(default=None, description="Partition keys of 'static'.")

    def build(self) -> dg.PartitionsDefinition:
        """The PartitionsDefinition described.

        Raises:
            ValueError: A required attribute is missing.
        """
        if self.type == "static":
            if not self.keys:
                raise ValueError("partitions of type 'static' need 'keys'")
            return dg.StaticPartitionsDefinition(list(self.keys))
        if not self.start_date:
            raise ValueError(f"partitions of type {self.type!r} need 'start_date'")
        kwargs: dict[str, Any] = {"start_date": self.start_date, "end_offset": self.end_offset}
        if self.timezone:
            kwargs["timezone"] = self.timezone
        return _TIME_WINDOWS[self.type](**kwargs)


_ENV_REFERENCE = re.compile(r"""\{\{\s*env(?:\.(\w+)|\(\s*['"](\w+)['"]\s*\))\s*\}\}""")


def _render_env(text: str, action: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        value = os.environ.get(name)
        if value is None:
            raise ChannelConfigError(
                f"channel {action!r}: environment variable {name!r} is not set"
            )
        return value

    return _ENV_REFERENCE.sub(substitute, text)


def resolve_channel_value(value: Any, action: str) -> Any:
    """Resolve one channel field from YAML, leaving the channel's own Jinja2 templates intact.

    Dagster renders every ``{{ ... }}`` of a component's YAML at load time, and silently renders
    an unknown name as "" (``"Hi {{ name }}"`` would become ``"Hi "``). Channel fields are
    therefore not rendered by Dagster: only ``{{ env.NAME }}`` is substituted (at load time),
    and ``{env: NAME}`` becomes a ``dg.EnvVar`` that secret fields read in the run, so the
    secret never appears in the component's configuration.
    """
    if isinstance(value, Mapping):
        if set(value) == {"env"} and isinstance(value["env"], str):
            return dg.EnvVar(value["env"])
        return {key: resolve_channel_value(item, action) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_channel_value(item, action) for item in value]
    if isinstance(value, str):
        return _render_env(value, action)
    return value


def _resolve_channels(_context: dg.ResolutionContext, value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise ChannelConfigError("channels must map each action name to a channel description")
    resolved: dict[str, dict[str, Any]] = {}
    for action, spec in value.items():
        if not isinstance(spec, Mapping):
            raise ChannelConfigError(f"channel {action!r} must be a mapping with a 'type'")
        resolved[str(action)] = {
            key: resolve_channel_value(item, str(action)) for key, item in spec.items()
        }
    return resolved


def build_channel(action: str, spec: Mapping[str, Any]) -> Channel:
    """A channel from its YAML description (``type`` plus the channel's fields).

    Raises:
        ChannelConfigError: Unknown type, a class that is not a Channel, or invalid fields.
    """
    params = dict(spec)
    kind = params.pop("type", None)
    if not isinstance(kind, str) or not kind:
        raise ChannelConfigError(
            f"channel {action!r} needs a 'type': one of {sorted(CHANNEL_TYPES)} or "
            "'package.module:ChannelClass'"
        )
    path = CHANNEL_TYPES.get(kind, kind)
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise ChannelConfigError(
            f"channel {action!r}: unknown type {kind!r}; use one of {sorted(CHANNEL_TYPES)} or "
            "'package.module:ChannelClass'"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ChannelConfigError(f"channel {action!r}: cannot load type {kind!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Channel)):
        raise ChannelConfigError(f"channel {action!r}: {kind!r} is not a Channel class")
    try:
        return cls(**params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or kind}: {error['msg']}"
            for error in exc.errors()
        )
        raise ChannelConfigError(f"channel {action!r} ({kind}) is invalid: {problems}") from None


class ExecutionComponent(dg.Component, dg.Model, dg.Resolvable):
    """Execute a playbook on every new partition of an insight asset.

    Builds, with :func:`~autoexec_dagster.dagster.defs_factory.build_execution_defs`, the
    execution assets ``<playbook>/plan``, ``<playbook>/actions`` and ``<playbook>/escalations``,
    blocking Great Expectations checks on the insight, the job ``<playbook>_execution_job``, the
    sensor ``<playbook>_sensor`` (stopped unless ``sensor_default_status: running``) and an
    optional batch schedule.
    """

    insight: str = Field(description="Asset key of the insight, e.g. 'churn_scores' or 'ml/churn'.")
    playbook: str | dict[str, Any] = Field(
        description="Path of the playbook YAML (relative to this component's folder), or the "
        "playbook inline."
    )
    channels: Annotated[
        dict[str, dict[str, Any]],
        dg.Resolver(
            _resolve_channels,
            model_field_type=dict[str, dict[str, Any]],
            description="Per action: {type: email|webhook|sql|python|'module:Class', <fields>}. "
            "Channel templates are kept as written; '{{ env.NAME }}' is substituted at load "
            "time and {env: NAME} is a secret read from the environment in the run.",
        ),
    ] = Field(default_factory=dict)
    ledger_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the action ledger; default $AUTOEXEC_LEDGER_URL, else "
        "autoexec_ledger.db in $DAGSTER_HOME.",
    )
    partitions: PartitionsModel | None = Field(
        default=None, description="The insight's partitions (required if it is partitioned)."
    )
    outcomes: str | None = Field(
        default=None,
        description="Asset key of an outcome asset (entity key, occurred_at, metric columns): "
        "adds <playbook>/experiment, /learnings and /uplift and the outcomes sensor.",
    )
    outcomes_partitions: PartitionsModel | None = Field(
        default=None, description="The outcome asset's partitions (default: the insight's)."
    )
    dry_run: bool | None = Field(
        default=None, description="Record without sending; default: the playbook's guardrail."
    )
    group_name: str | None = Field(default=None, description="Asset group (default: playbook).")
    sensor_default_status: Literal["running", "stopped"] = Field(
        default="stopped",
        description="Whether the sensor runs without being switched on in the UI.",
    )
    minimum_interval_seconds: int = Field(default=30, ge=1, description="Sensor tick interval.")
    workflow_sensor_interval_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Tick interval of the workflow sensor (playbooks with workflows); default: "
        "minimum_interval_seconds.",
    )
    flagged_metadata_key: str = Field(
        default=FLAGGED_METADATA_KEY,
        description="Insight metadata key holding the number of flagged entities.",
    )
    schedule: str | None = Field(default=None, description="Cron string of a batch schedule.")
    schedule_default_status: Literal["running", "stopped"] = Field(default="stopped")
    schedule_timezone: str | None = Field(default=None)
    flagged_share_blocking: bool = Field(
        default=True, description="Whether the flagged-share check blocks execution."
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=MAX_SHARDS,
        description="Steps the delivery of a partition is split into, each with 1/N of every "
        "channel's limits, under the code location's executor (e.g. celery); needs a ledger "
        "every worker reaches. 1: one execute step.",
    )

    def load_playbook(self, context: dg.ComponentLoadContext) -> Playbook:
        """The playbook: inline, or read from a path relative to the component's folder.

        Raises:
            PlaybookError: The file is missing or the playbook is invalid.
        """
        if isinstance(self.playbook, dict):
            return Playbook.from_dict(self.playbook, source="the component's inline playbook")
        path = Path(self.playbook)
        if not path.is_absolute():
            base = context.path if context.path.is_dir() else context.path.parent
            path = base / path
        return Playbook.from_yaml(path)

    def build_channels(self) -> dict[str, Channel]:
        """The channels described under ``channels``.

        Raises:
            ChannelConfigError: A channel description is invalid.
        """
        return {action: build_channel(action, spec) for action, spec in self.channels.items()}

    def execute(
        self,
        context: dg.OpExecutionContext,
        plan: pd.DataFrame,
        *,
        playbook: Playbook,
        ledger: ActionLedger,
        channels: Mapping[str, Channel],
        partition_key: str,
        insight: str,
        dry_run: bool | None,
    ) -> ExecutionReport:
        """Execute a routed plan; override in a subclass to customise execution.

        The default calls :func:`autoexec_dagster.execute_plan` (through
        :func:`~autoexec_dagster.dagster.execution_assets.default_execute`).

        Args:
            context: The ``execute`` op's context.
            plan: The routed plan of the partition.
            playbook: The playbook.
            ledger: The action ledger.
            channels: Channel per action name.
            partition_key: The insight partition ("" when unpartitioned).
            insight: The insight asset key as a string.
            dry_run: Record without sending; None follows the playbook.

        Returns:
            The execution report.
        """
        return default_execute(
            context,
            plan,
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=partition_key,
            insight=insight,
            dry_run=dry_run,
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """Build the execution definitions.

        Raises:
            PlaybookError: The playbook is invalid.
            ChannelConfigError: A channel is invalid or an action has no channel.
        """
        overrides_execute = type(self).execute is not ExecutionComponent.execute
        if self.shards > 1 and overrides_execute:
            raise ValueError(
                f"{type(self).__name__} overrides execute(), which replaces the single execute "
                f"step, and shards: {self.shards} replaces that step by record, deliver and "
                "merge steps: use one or the other"
            )
        try:
            partitions_def = self.partitions.build() if self.partitions else None
            outcome_partitions = (
                self.outcomes_partitions.build() if self.outcomes_partitions else None
            )
        except ValueError as exc:
            raise ValueError(f"ExecutionComponent partitions: {exc}") from None
        return build_execution_defs(
            insight=self.insight,
            playbook=self.load_playbook(context),
            channels=self.build_channels(),
            ledger=self.ledger_url or None,
            partitions_def=partitions_def,
            dry_run=self.dry_run,
            group_name=self.group_name,
            sensor_default_status=dg.DefaultSensorStatus.RUNNING
            if self.sensor_default_status == "running"
            else dg.DefaultSensorStatus.STOPPED,
            minimum_interval_seconds=self.minimum_interval_seconds,
            workflow_sensor_interval_seconds=self.workflow_sensor_interval_seconds,
            flagged_metadata_key=self.flagged_metadata_key,
            schedule=self.schedule,
            schedule_default_status=dg.DefaultScheduleStatus.RUNNING
            if self.schedule_default_status == "running"
            else dg.DefaultScheduleStatus.STOPPED,
            schedule_timezone=self.schedule_timezone,
            flagged_share_blocking=self.flagged_share_blocking,
            execute_fn=self.execute if self.shards == 1 else None,
            shards=self.shards,
            outcomes=self.outcomes,
            outcomes_partitions_def=outcome_partitions,
        )
