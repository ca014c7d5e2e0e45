"""``build_execution_defs``: what it builds, what it accepts, and that it merges anywhere."""

from pathlib import Path

import dagster as dg
import pytest

from autoexec_dagster.dagster.defs_factory import build_execution_defs, resolve_insight
from autoexec_dagster.dagster.ledger_resource import LedgerHandle, default_ledger_url
from autoexec_dagster.errors import ChannelConfigError, LedgerError, PlaybookError
from autoexec_dagster.ledger.action_ledger import ActionLedger
from tests.conftest import churn_playbook, churn_scores
from tests.test_execution_assets import (
    INSIGHT,
    JOB,
    PLAYBOOK,
    Recorder,
    make_project,
    recording_channels,
)

DAILY = dg.DailyPartitionsDefinition(start_date="2026-11-01")
EXECUTION_KEYS = {dg.AssetKey([PLAYBOOK, name]) for name in ("plan", "actions", "escalations")}


def build(insight, **kwargs) -> dg.Definitions:
    kwargs.setdefault("playbook", churn_playbook())
    kwargs.setdefault("channels", recording_channels(Recorder()))
    kwargs.setdefault("ledger", "sqlite:///unused.db")
    return build_execution_defs(insight=insight, **kwargs)


def with_insight(spec: dg.AssetSpec, execution: dg.Definitions) -> dg.Definitions:
    return dg.Definitions.merge(dg.Definitions(assets=[spec]), execution)


@dg.asset(key=["ml", INSIGHT], partitions_def=DAILY)
def nested_insight() -> None: ...


@pytest.mark.parametrize(
    ("insight", "key", "partitions"),
    [
        (dg.AssetKey(INSIGHT), dg.AssetKey(INSIGHT), None),
        (INSIGHT, dg.AssetKey(INSIGHT), None),
        ("ml/churn_scores", dg.AssetKey(["ml", INSIGHT]), None),
        (["ml", INSIGHT], dg.AssetKey(["ml", INSIGHT]), None),
        (nested_insight, dg.AssetKey(["ml", INSIGHT]), DAILY),
        (dg.AssetSpec(INSIGHT, partitions_def=DAILY), dg.AssetKey(INSIGHT), DAILY),
    ],
    ids=["asset-key", "name", "path", "parts", "assets-definition", "asset-spec"],
)
def test_every_insight_form_is_accepted(insight, key, partitions) -> None:
    assert resolve_insight(insight) == (key, partitions)
    defs = with_insight(dg.AssetSpec(key, partitions_def=partitions), build(insight))

    graph = defs.resolve_asset_graph()

    assert set(graph.get_all_asset_keys()) == EXECUTION_KEYS | {key}
    plan, escalations, actions = (
        dg.AssetKey([PLAYBOOK, name]) for name in ("plan", "escalations", "actions")
    )
    assert graph.get(plan).parent_keys == {key}
    assert graph.get(escalations).parent_keys == {key, plan}
    assert graph.get(actions).parent_keys == {key, plan, escalations}
    for execution_key in EXECUTION_KEYS:
        node = graph.get(execution_key)
        assert node.partitions_def == partitions
        assert node.group_name == PLAYBOOK
        assert node.is_executable


def test_partitions_can_be_given_for_a_bare_key() -> None:
    defs = with_insight(
        dg.AssetSpec(INSIGHT, partitions_def=DAILY), build(INSIGHT, partitions_def=DAILY)
    )
    assert defs.resolve_asset_graph().get(dg.AssetKey([PLAYBOOK, "plan"])).partitions_def == DAILY
    job = defs.resolve_job_def(JOB)
    assert job.partitions_def == DAILY


def test_the_definitions_hold_checks_job_sensor_and_one_namespaced_resource() -> None:
    spec = dg.AssetSpec(INSIGHT, partitions_def=DAILY)
    execution = build(spec, group_name="retention")
    defs = with_insight(spec, execution)

    assert set(execution.resources or {}) == {f"autoexec_{PLAYBOOK}_io_manager"}
    graph = defs.resolve_asset_graph()
    checks = {k.name: graph.get(k) for k in graph.asset_check_keys}
    assert set(checks) == {f"{PLAYBOOK}_valid_input", f"{PLAYBOOK}_flagged_share"}
    assert checks[f"{PLAYBOOK}_valid_input"].blocking
    assert checks[f"{PLAYBOOK}_flagged_share"].blocking
    assert all(c.key.asset_key == dg.AssetKey(INSIGHT) for c in checks.values())
    assert graph.get(dg.AssetKey([PLAYBOOK, "actions"])).group_name == "retention"
    job = defs.resolve_job_def(JOB)
    assert job.executor_def.name == "in_process"
    assert set(job.asset_layer.selected_asset_keys) == EXECUTION_KEYS
    assert {k.name for k in job.asset_layer.asset_graph.asset_check_keys} >= set(checks)
    assert defs.resolve_sensor_def(f"{PLAYBOOK}_sensor").job_name == JOB
    assert not list(execution.schedules or [])  # only with schedule=


def test_merging_into_a_project_with_its_own_resources_works(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(80)})

    repository = project.defs.get_repository_def()

    assert {"io_manager", "ledger", f"autoexec_{PLAYBOOK}_io_manager"} <= set(
        repository.get_top_level_resources()
    )
    assert repository.get_top_level_resources()["ledger"] is not None
    project.materialize_insight("p1")
    assert project.run("p1").success
    assert project.recorder.keys


def test_two_playbooks_on_one_insight_merge_without_conflict(tmp_path: Path) -> None:
    spec = dg.AssetSpec(INSIGHT, partitions_def=DAILY)
    second = churn_playbook().model_copy(update={"name": "winback"})
    defs = dg.Definitions.merge(
        dg.Definitions(assets=[spec]), build(spec), build(spec, playbook=second)
    )

    graph = defs.resolve_asset_graph()

    assert dg.AssetKey(["winback", "actions"]) in graph.get_all_asset_keys()
    assert len(graph.asset_check_keys) == 4
    assert defs.resolve_job_def("winback_execution_job") is not None


def test_the_playbook_can_be_a_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "playbook.yaml"
    path.write_text(churn_playbook().to_yaml(), encoding="utf-8")
    defs = with_insight(dg.AssetSpec(INSIGHT), build(INSIGHT, playbook=str(path)))
    assert dg.AssetKey([PLAYBOOK, "plan"]) in defs.resolve_asset_graph().get_all_asset_keys()
    with pytest.raises(PlaybookError, match="cannot read playbook"):
        build(INSIGHT, playbook=tmp_path / "missing.yaml")


def test_configuration_errors_are_raised_when_definitions_load(tmp_path: Path) -> None:
    with pytest.raises(ChannelConfigError, match="no channel for action\\(s\\) 'crm_task'"):
        build(INSIGHT, channels={"retention_email": recording_channels(Recorder())["crm_task"]})
    with pytest.raises(ChannelConfigError, match="must be an autoexec_dagster Channel"):
        build(INSIGHT, channels={"retention_email": print, "crm_task": print})
    with pytest.raises(LedgerError, match="not a valid SQLAlchemy URL"):
        build(INSIGHT, ledger="not a url")
    with pytest.raises(TypeError, match="insight must be"):
        build(42)

    @dg.multi_asset(specs=[dg.AssetSpec("a"), dg.AssetSpec("b")])
    def two():
        return None

    with pytest.raises(ValueError, match="holds 2 assets"):
        build(two)
    with pytest.raises(ValueError, match="minimum_interval_seconds"):
        build(INSIGHT, minimum_interval_seconds=0)


def test_building_definitions_does_not_touch_the_ledger(tmp_path: Path) -> None:
    target = tmp_path / "ledger.db"
    build(INSIGHT, ledger=f"sqlite:///{target}")
    assert not target.exists()


def test_the_default_ledger_follows_env_then_dagster_home_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOEXEC_LEDGER_URL", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_ledger_url() == f"sqlite:///{tmp_path / 'autoexec_ledger.db'}"
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert default_ledger_url() == f"sqlite:///{home / 'autoexec_ledger.db'}"
    monkeypatch.setenv("AUTOEXEC_LEDGER_URL", "sqlite:///elsewhere.db")
    assert default_ledger_url() == "sqlite:///elsewhere.db"


def test_without_a_ledger_runs_write_the_default_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AUTOEXEC_LEDGER_URL", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    project = make_project(tmp_path, {"p1": churn_scores(60)})
    execution = build_execution_defs(
        insight=project.insight,
        playbook=project.playbook,
        channels=recording_channels(project.recorder),
    )
    defs = dg.Definitions.merge(
        dg.Definitions(assets=[project.insight], resources={"io_manager": project.io_manager}),
        execution,
    )
    project.materialize_insight("p1")

    result = defs.resolve_job_def(JOB).execute_in_process(
        partition_key="p1", instance=project.instance
    )

    assert result.success
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'autoexec_ledger.db'}")
    assert int(ledger.summary(playbook=PLAYBOOK)["count"].sum()) == 60


def test_ledger_handle_opens_lazily_and_masks_passwords(tmp_path: Path) -> None:
    handle = LedgerHandle("postgresql+psycopg://autoexec:s3cret@db.example.com/ledger")
    assert "s3cret" not in handle.description and "***" in handle.description
    existing = ActionLedger(f"sqlite:///{tmp_path / 'x.db'}")
    assert LedgerHandle(existing).get() is existing
    with pytest.raises(LedgerError, match="must be an ActionLedger"):
        LedgerHandle(42)  # type: ignore[arg-type]


def _error_chain(exc: BaseException) -> str:
    parts = []
    current: BaseException | None = exc
    while current is not None:
        parts.append(str(current))
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def test_a_partitioned_insight_given_by_key_alone_fails_when_definitions_load() -> None:
    defs = with_insight(dg.AssetSpec(INSIGHT, partitions_def=DAILY), build(INSIGHT))

    with pytest.raises(dg.DagsterInvalidDefinitionError) as raised:
        dg.Definitions.validate_loadable(defs)

    message = _error_chain(raised.value)
    assert f"insight {INSIGHT!r} is partitioned (DailyPartitionsDefinition" in message, message
    assert "pass partitions_def=" in message and "or the insight's AssetsDefinition" in message


def test_a_bare_key_with_partitions_def_requests_runs_that_launch(tmp_path: Path) -> None:
    project = make_project(tmp_path, {"p1": churn_scores(40), "p2": churn_scores(40, seed=2)})
    partitions = project.insight.partitions_def
    execution = build_execution_defs(
        insight=INSIGHT,
        playbook=project.playbook,
        channels=recording_channels(project.recorder),
        ledger=project.ledger,
        partitions_def=partitions,
    )
    defs = dg.Definitions.merge(
        dg.Definitions(assets=[project.insight], resources={"io_manager": project.io_manager}),
        execution,
    )
    dg.Definitions.validate_loadable(defs)
    project.materialize_insight("p2")
    sensor = defs.resolve_sensor_def(f"{PLAYBOOK}_sensor")

    (request,) = (
        sensor.evaluate_tick(
            dg.build_sensor_context(instance=project.instance, definitions=defs)
        ).run_requests
        or []
    )
    job = defs.resolve_job_def(JOB)
    result = job.execute_in_process(
        partition_key=request.partition_key, instance=project.instance, tags=request.tags
    )

    assert request.partition_key == "p2" and job.partitions_def == partitions
    assert result.success
    assert project.ledger.summary(playbook=PLAYBOOK, partition_key="p2")["count"].sum() == 40
