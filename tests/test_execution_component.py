"""``ExecutionComponent``: the execution layer declared in a ``defs.yaml``."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from autoexec_dagster.channels.base import ActionRequest, Channel
from autoexec_dagster.channels.python import PythonChannel
from autoexec_dagster.components.execution_component import (
    ExecutionComponent,
    build_channel,
    resolve_channel_value,
)
from autoexec_dagster.errors import ChannelConfigError
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.playbook import Playbook
from tests.conftest import churn_playbook, churn_scores
from tests.test_execution_assets import INSIGHT, JOB, PLAYBOOK, insight_asset

COMPONENT_TYPE = "autoexec_dagster.components.execution_component.ExecutionComponent"
DELIVERED: list[str] = []


def deliver(request: ActionRequest) -> str:
    """The delivery function the YAML's python channels name by import path."""
    DELIVERED.append(request.idempotency_key)
    return "ok"


def attributes(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    python = {"type": "python", "function": f"{__name__}:deliver"}
    return {
        "insight": INSIGHT,
        "playbook": "playbook.yaml",
        "partitions": {"type": "static", "keys": ["p1", "p2"]},
        "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}",
        "channels": {"retention_email": python, "crm_task": dict(python)},
        **overrides,
    }


def test_the_component_loads_from_yaml_and_builds_the_execution_layer(tmp_path: Path) -> None:
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(
            component_cls=ExecutionComponent,
            defs_yaml_contents={"type": COMPONENT_TYPE, "attributes": attributes(tmp_path)},
        )
        (path / "playbook.yaml").write_text(
            churn_playbook(max_flagged_fraction=0.9).to_yaml(), encoding="utf-8"
        )
        with sandbox.load_component_and_build_defs(defs_path=path) as (component, built):
            assert isinstance(component, ExecutionComponent)
            frames = {"p1": churn_scores(80), "p2": churn_scores(20)}
            insight = insight_asset(frames, dg.StaticPartitionsDefinition(["p1", "p2"]))
            io = dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))
            defs = dg.Definitions.merge(
                dg.Definitions(assets=[insight], resources={"io_manager": io}), built
            )
            graph = defs.resolve_asset_graph()
            keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
            assert keys >= {f"{PLAYBOOK}/plan", f"{PLAYBOOK}/actions", f"{PLAYBOOK}/escalations"}
            sensor = defs.resolve_sensor_def(f"{PLAYBOOK}_sensor")
            assert sensor.default_status == dg.DefaultSensorStatus.STOPPED

            instance = dg.DagsterInstance.ephemeral()
            dg.materialize(
                [insight], partition_key="p1", instance=instance, resources={"io_manager": io}
            )
            DELIVERED.clear()
            result = defs.resolve_job_def(JOB).execute_in_process(
                partition_key="p1", instance=instance
            )

    assert result.success
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    succeeded = ledger.actions(playbook=PLAYBOOK, states=["succeeded"])
    assert sorted(DELIVERED) == sorted(succeeded["idempotency_key"]) and DELIVERED


def test_an_inline_playbook_schedule_and_running_sensor(tmp_path: Path) -> None:
    context = dg.ComponentTree.for_test().load_context
    component = ExecutionComponent.resolve_from_yaml(
        yaml.safe_dump(
            attributes(
                tmp_path,
                playbook=json_ready(churn_playbook()),
                partitions={"type": "daily", "start_date": "2026-11-01"},
                sensor_default_status="running",
                minimum_interval_seconds=10,
                schedule="0 6 * * *",
                group_name="retention",
            )
        )
    )

    built = component.build_defs(context)

    defs = dg.Definitions.merge(
        dg.Definitions(
            assets=[
                dg.AssetSpec(INSIGHT, partitions_def=dg.DailyPartitionsDefinition("2026-11-01"))
            ]
        ),
        built,
    )
    sensor = defs.resolve_sensor_def(f"{PLAYBOOK}_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 10
    schedule = defs.resolve_schedule_def(f"{PLAYBOOK}_schedule")
    assert schedule.cron_schedule == "0 6 * * *"
    node = defs.resolve_asset_graph().get(dg.AssetKey([PLAYBOOK, "actions"]))
    assert node.group_name == "retention"
    assert isinstance(node.partitions_def, dg.DailyPartitionsDefinition)


def json_ready(playbook: Playbook) -> dict[str, Any]:
    return yaml.safe_load(playbook.to_yaml())


class AuditedExecution(ExecutionComponent):
    """A user's customisation: record every execution, then execute as usual."""

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
        context.log.info(f"audit: executing {len(plan)} rows of {insight} [{partition_key}]")
        AUDIT.append((partition_key, len(plan)))
        return super().execute(
            context,
            plan,
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            partition_key=partition_key,
            insight=insight,
            dry_run=True,
        )


AUDIT: list[tuple[str, int]] = []


def test_execute_can_be_overridden_in_a_subclass(tmp_path: Path) -> None:
    component = AuditedExecution.resolve_from_yaml(
        yaml.safe_dump(
            attributes(tmp_path, playbook=json_ready(churn_playbook(max_flagged_fraction=0.9)))
        )
    )
    built = component.build_defs(dg.ComponentTree.for_test().load_context)
    frames = {"p1": churn_scores(50), "p2": churn_scores(5)}
    insight = insight_asset(frames, dg.StaticPartitionsDefinition(["p1", "p2"]))
    io = dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))
    defs = dg.Definitions.merge(
        dg.Definitions(assets=[insight], resources={"io_manager": io}), built
    )
    instance = dg.DagsterInstance.ephemeral()
    dg.materialize([insight], partition_key="p1", instance=instance, resources={"io_manager": io})
    AUDIT.clear()
    DELIVERED.clear()

    result = defs.resolve_job_def(JOB).execute_in_process(partition_key="p1", instance=instance)

    assert result.success
    assert AUDIT == [("p1", 50)]
    assert DELIVERED == []  # the override made it a dry run


def test_channel_templates_are_kept_and_env_is_substituted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOK_HOST", "hooks.example.org")
    value = resolve_channel_value(
        {
            "subject": "We miss you, {{ name }}",
            "url": "https://{{ env.HOOK_HOST }}/churn",
            "secret": {"env": "HOOK_SECRET"},
            "allowed_hosts": ["{{ env('HOOK_HOST') }}"],
        },
        "crm_task",
    )
    assert value["subject"] == "We miss you, {{ name }}"
    assert value["url"] == "https://hooks.example.org/churn"
    assert isinstance(value["secret"], dg.EnvVar) and value["secret"].env_var_name == "HOOK_SECRET"
    assert value["allowed_hosts"] == ["hooks.example.org"]
    with pytest.raises(ChannelConfigError, match="'NOPE' is not set"):
        resolve_channel_value("{{ env.NOPE }}", "crm_task")


def test_channels_are_built_by_type_with_clear_errors() -> None:
    channel = build_channel("crm_task", {"type": "python", "function": f"{__name__}:deliver"})
    assert isinstance(channel, PythonChannel)
    custom = build_channel(
        "crm_task",
        {"type": "autoexec_dagster.channels.python:PythonChannel", "function": "x.y:z"},
    )
    assert isinstance(custom, PythonChannel)
    with pytest.raises(ChannelConfigError, match="needs a 'type'"):
        build_channel("crm_task", {"function": "x:y"})
    with pytest.raises(ChannelConfigError, match="unknown type 'carrier_pigeon'"):
        build_channel("crm_task", {"type": "carrier_pigeon"})
    with pytest.raises(ChannelConfigError, match="is not a Channel class"):
        build_channel("crm_task", {"type": "pandas:DataFrame"})
    with pytest.raises(ChannelConfigError, match=r"channel 'crm_task' \(python\) is invalid"):
        build_channel("crm_task", {"type": "python", "max_concurrency": 0})


def test_a_missing_playbook_file_is_a_clear_error(tmp_path: Path) -> None:
    component = ExecutionComponent.resolve_from_yaml(
        yaml.safe_dump(attributes(tmp_path, playbook="nowhere.yaml"))
    )
    with pytest.raises(Exception, match="cannot read playbook"):
        component.build_defs(dg.ComponentTree.for_test().load_context)


def test_a_secret_from_yaml_stays_an_env_var_in_the_channel(tmp_path: Path) -> None:
    webhook = {
        "type": "webhook",
        "url": "https://hooks.example.org/churn",
        "secret": {"env": "CRM_WEBHOOK_SECRET"},
        "allowed_hosts": ["hooks.example.org"],
    }
    component = ExecutionComponent.resolve_from_yaml(
        yaml.safe_dump(
            attributes(
                tmp_path,
                channels={"crm_task": webhook, "retention_email": webhook},
                playbook=json_ready(churn_playbook()),
            )
        )
    )

    channel = component.build_channels()["crm_task"]

    assert isinstance(channel.secret, dg.EnvVar)  # type: ignore[attr-defined]
    assert channel.secret.env_var_name == "CRM_WEBHOOK_SECRET"  # type: ignore[attr-defined]


def test_outcomes_in_yaml_add_the_outcome_assets_and_sensor(tmp_path: Path) -> None:
    playbook = json_ready(churn_playbook())
    playbook["outcome"] = {"metric": "retained", "window": "14d"}
    playbook.setdefault("guardrails", {})["holdout_fraction"] = 0.1
    component = ExecutionComponent.resolve_from_yaml(
        yaml.safe_dump(
            attributes(
                tmp_path,
                playbook=playbook,
                partitions={"type": "daily", "start_date": "2026-11-01"},
                outcomes="churn_outcomes",
            )
        )
    )
    built = component.build_defs(dg.ComponentTree.for_test().load_context)
    daily = dg.DailyPartitionsDefinition("2026-11-01")
    defs = dg.Definitions.merge(
        dg.Definitions(
            assets=[
                dg.AssetSpec(INSIGHT, partitions_def=daily),
                dg.AssetSpec("churn_outcomes", partitions_def=daily),
            ]
        ),
        built,
    )
    graph = defs.resolve_asset_graph()
    uplift = graph.get(dg.AssetKey([PLAYBOOK, "uplift"]))
    assert isinstance(uplift.partitions_def, dg.DailyPartitionsDefinition)
    assert dg.AssetKey("churn_outcomes") in uplift.parent_keys
    # No experiment in this playbook: uplift only.
    assert not graph.has(dg.AssetKey([PLAYBOOK, "experiment"]))
    assert defs.resolve_sensor_def(f"{PLAYBOOK}_outcomes_sensor").job_name == (
        f"{PLAYBOOK}_outcomes_job"
    )
