"""The reference campaign pipeline: generated metrics, the click insight, the next sends of the
flagged campaigns, the outcomes read from the tracking endpoint's events, the variant grid and the
playbook."""

import datetime as dt
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from assets.campaigns import (
    EMAIL_DOMAINS,
    FIRST_DAY,
    INSIGHT_COLUMNS,
    METRIC_COLUMNS,
    N_CAMPAIGNS,
    OUTCOME_COLUMNS,
    SEGMENT_NAMES,
    SEND_COLUMNS,
    SEND_SIZE,
    UNDERPERFORMING_RATIO,
    campaign_catalogue,
    campaign_click_insight,
    campaign_metrics,
    campaign_outcomes,
    campaign_sends,
    click_insight,
    generate_campaign_metrics,
    next_sends,
    read_outcomes,
)
from autoexec_dagster import Playbook, route
from autoexec_dagster.experiments.experiment import check_variant_fields
from resources.campaign_channels import (
    CAMPAIGN_PLAYBOOK_PATH,
    CampaignEmailChannel,
    campaign_channels,
)
from resources.campaign_variants import (
    BODY_TEMPLATE,
    CALLS_TO_ACTION,
    CONTROL,
    SUBJECTS,
    TRUE_CLICK_RATES,
    TRUE_OPEN_RATES,
    playbook_variants,
    true_best,
    true_lift,
    variant_grid,
)
from resources.tracking_server import TrackingServer, sign_token

DAYS = tuple(FIRST_DAY + dt.timedelta(days=d) for d in range(0, 14, 3))
SECRET = "reference-campaigns-secret"


def test_the_campaigns_spread_evenly_over_four_segments_with_their_own_rates() -> None:
    campaigns = campaign_catalogue()
    assert len(campaigns) == N_CAMPAIGNS == 80
    assert campaigns["campaign_id"].is_unique
    assert campaigns.groupby("segment").size().to_dict() == dict.fromkeys(SEGMENT_NAMES, 20)
    assert campaigns.equals(campaign_catalogue())
    assert (campaigns["true_click_rate"] < campaigns["open_rate"]).all()


@pytest.mark.parametrize("day", DAYS, ids=str)
def test_the_metrics_are_seeded_daily_counts(day: dt.date) -> None:
    metrics = generate_campaign_metrics(day)
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert len(metrics) == N_CAMPAIGNS
    assert metrics.equals(generate_campaign_metrics(day))
    assert not metrics.equals(generate_campaign_metrics(day + dt.timedelta(days=1)))
    assert (metrics["sends"] > 0).all()
    assert (metrics["opens"] <= metrics["sends"]).all()
    assert (metrics["clicks"] <= metrics["opens"]).all()
    assert (metrics["unsubscribes"] <= metrics["opens"]).all()


@pytest.mark.parametrize("day", DAYS, ids=str)
def test_flagged_campaigns_are_exactly_those_below_eight_tenths_of_their_segment_median(
    day: dt.date,
) -> None:
    metrics = generate_campaign_metrics(day)
    insight = click_insight(metrics)
    assert list(insight.columns) == list(INSIGHT_COLUMNS)
    # Recomputed by hand, campaign by campaign.
    for segment in SEGMENT_NAMES:
        rows = metrics[metrics["segment"] == segment]
        rates = (rows["clicks"] / rows["sends"]).to_numpy()
        benchmark = float(np.median(rates))
        expected = set(rows["campaign_id"][rates < UNDERPERFORMING_RATIO * benchmark])
        flagged = insight[(insight["segment"] == segment) & insight["underperforming"]]
        assert set(flagged["campaign_id"]) == expected, segment
        mine = insight[insight["segment"] == segment]
        assert np.allclose(mine["segment_benchmark"], benchmark)
        assert np.allclose(mine["click_rate"], rates)
    # A weak campaign among the others: the story has campaigns to act on every day.
    assert 10 <= int(insight["underperforming"].sum()) <= 30


def test_a_zero_benchmark_or_no_sends_flags_nothing_and_divides_by_nothing() -> None:
    metrics = pd.DataFrame(
        {
            "date": "2026-11-01",
            "campaign_id": ["A", "B", "C"],
            "campaign_name": ["a", "b", "c"],
            "segment": ["vip", "vip", "lapsed"],
            "sends": [0, 100, 50],
            "opens": [0, 10, 5],
            "clicks": [0, 0, 0],
            "unsubscribes": [0, 0, 0],
        }
    )
    insight = click_insight(metrics)
    assert insight["click_rate"].tolist() == [0.0, 0.0, 0.0]
    assert insight["benchmark_ratio"].tolist() == [0.0, 0.0, 0.0]
    assert not insight["underperforming"].any()


@pytest.mark.parametrize("day", DAYS[:2], ids=str)
def test_sends_are_for_flagged_campaigns_only_one_row_per_recipient(day: dt.date) -> None:
    insight = click_insight(generate_campaign_metrics(day))
    sends = next_sends(insight, day)
    assert list(sends.columns) == list(SEND_COLUMNS)
    flagged = insight[insight["underperforming"]]
    assert set(sends["campaign_id"]) == set(flagged["campaign_id"])
    assert sends.groupby("campaign_id").size().eq(SEND_SIZE).all()
    assert sends["recipient_id"].is_unique
    assert sends["flagged"].all()
    assert sends["email"].is_unique
    domains = sends["email"].str.rpartition("@")[2]
    assert set(domains) <= set(EMAIL_DOMAINS)
    assert sends["email"].str.fullmatch(r"[a-z]+\.[a-z]+\.\d{5}@example\.(com|org|net)").all()
    segments = flagged.set_index("campaign_id")["segment"]
    assert (sends["segment"] == sends["campaign_id"].map(segments)).all()
    # Each day's send reaches new recipients: no one is mailed twice by the story.
    later = next_sends(insight, day + dt.timedelta(days=1))
    assert not set(sends["recipient_id"]) & set(later["recipient_id"])


def _record(db: Path, rows: list[tuple[str, str, str]]) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO events (kind, recipient_id, campaign_id, idempotency_key, "
            "token_sha256, occurred_at, received_at) VALUES (?, ?, 'CMP-001', 'k', 't', ?, ?)",
            [(kind, who, when, when) for kind, who, when in rows],
        )


def test_outcomes_are_the_days_events_from_the_tracking_database(tmp_path: Path) -> None:
    db = tmp_path / "tracking.sqlite"
    # The server creates the schema; the events go in through real HTTP elsewhere (see
    # tests/test_tracking_server.py); here the rows are placed to pin the day's boundaries.
    with TrackingServer(SECRET, db):
        pass
    _record(
        db,
        [
            ("open", "r1", "2026-11-02T23:59:59.999999+00:00"),
            ("open", "r1", "2026-11-03T00:00:00.000000+00:00"),
            ("click", "r1", "2026-11-03T00:05:00.000000+00:00"),
            ("open", "r2", "2026-11-03T10:00:00.000000+00:00"),
            ("unsubscribe", "r2", "2026-11-03T10:00:00.000000+00:00"),
            ("open", "r3", "2026-11-04T00:00:00.000000+00:00"),
        ],
    )
    outcomes = read_outcomes(db, dt.date(2026, 11, 3))
    assert list(outcomes.columns) == list(OUTCOME_COLUMNS)
    assert str(outcomes["occurred_at"].dt.tz) == "UTC"
    as_rows = [
        (r, t.isoformat(), o, c, u) for r, t, o, c, u in outcomes.itertuples(index=False, name=None)
    ]
    assert as_rows == [
        ("r1", "2026-11-03T00:00:00+00:00", 1, 0, 0),
        ("r1", "2026-11-03T00:05:00+00:00", 1, 1, 0),
        # An open and an unsubscribe at the same instant are one outcome row with both.
        ("r2", "2026-11-03T10:00:00+00:00", 1, 0, 1),
    ]
    assert read_outcomes(tmp_path / "missing.sqlite", dt.date(2026, 11, 3)).empty


def test_the_assets_materialize_one_day_with_the_counts_in_their_metadata(
    tmp_path: Path,
) -> None:
    db = tmp_path / "tracking.sqlite"
    day = DAYS[1].isoformat()
    with TrackingServer(SECRET, db):
        pass
    _record(db, [("click", "CMP-001-D003-000", f"{day}T09:00:00+00:00")])
    result = dg.materialize(
        [campaign_metrics, campaign_click_insight, campaign_sends, campaign_outcomes],
        partition_key=day,
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"campaign_outcomes": {"config": {"tracking_db": str(db)}}}},
    )
    assert result.success
    insight = result.output_for_node("campaign_click_insight")
    sends = result.output_for_node("campaign_sends")
    outcomes = result.output_for_node("campaign_outcomes")

    def meta(node: str) -> dict[str, object]:
        event = result.asset_materializations_for_node(node)[0]
        return {k: v.value for k, v in event.metadata.items()}

    assert meta("campaign_click_insight")["underperforming"] == int(
        insight["underperforming"].sum()
    )
    assert (
        meta("campaign_sends")["flagged"]
        == len(sends)
        == meta("campaign_sends")["dagster/row_count"]
    )
    assert set(sends["campaign_id"]) == set(insight[insight["underperforming"]]["campaign_id"])
    assert len(outcomes) == 1 and meta("campaign_outcomes")["clicked"] == 1


def test_the_variant_grid_names_every_subject_with_every_call_to_action() -> None:
    grid = variant_grid(["A {{ x }}", "B"], ["Go", "Come"], template="${call_to_action}: link")
    assert grid == {
        "s1_cta1": {"subject": "A {{ x }}", "template": "Go: link"},
        "s1_cta2": {"subject": "A {{ x }}", "template": "Come: link"},
        "s2_cta1": {"subject": "B", "template": "Go: link"},
        "s2_cta2": {"subject": "B", "template": "Come: link"},
    }
    with pytest.raises(ValueError, match="placeholder"):
        variant_grid(["A"], ["Go"], template="no call to action")
    with pytest.raises(ValueError, match="duplicates"):
        variant_grid(["A", "A"], ["Go"], template="${call_to_action}")
    with pytest.raises(ValueError, match="at least one"):
        variant_grid([], ["Go"], template="${call_to_action}")


def test_the_truth_has_one_clear_winner_and_rates_a_person_can_reach() -> None:
    assert set(TRUE_CLICK_RATES) == set(playbook_variants())
    best = true_best()
    assert best == "s2_cta2" and CONTROL == "s1_cta1"
    assert 0.3 <= true_lift(best) <= 0.5
    others = [rate for name, rate in TRUE_CLICK_RATES.items() if name != best]
    assert max(others) < TRUE_CLICK_RATES[best] / 1.3
    assert any(true_lift(name) < 0 for name in TRUE_CLICK_RATES)
    for name, rate in TRUE_CLICK_RATES.items():
        assert rate < TRUE_OPEN_RATES[name.split("_")[0]]


def test_the_playbook_yaml_runs_the_grid_as_the_python_builds_it() -> None:
    playbook = Playbook.from_yaml(CAMPAIGN_PLAYBOOK_PATH)
    assert (playbook.name, playbook.entity_key) == ("campaign_optimisation", "recipient_id")
    (rule,) = playbook.rules
    assert (rule.name, rule.when, rule.action) == ("underperforming", "flagged", "campaign_email")
    experiment = rule.experiment
    assert experiment is not None
    assert experiment.variants == playbook_variants()
    assert len(experiment.variants) == len(SUBJECTS) * len(CALLS_TO_ACTION)
    assert (experiment.allocation, experiment.metric, experiment.control) == (
        "thompson",
        "clicked",
        CONTROL,
    )
    assert experiment.window_seconds == 3 * 86_400
    assert experiment.guardrails == {"unsubscribed": 0.02}
    assert playbook.guardrails.holdout_fraction == 0.1
    assert playbook.guardrails.max_flagged_fraction == 1.0
    channel = campaign_channels(smtp_port=2525, tracking_url="http://127.0.0.1:9")["campaign_email"]
    assert isinstance(channel, CampaignEmailChannel)
    check_variant_fields(experiment, channel, action="campaign_email")
    assert "${" not in BODY_TEMPLATE.replace("${call_to_action}", "")


def test_the_plan_of_a_day_holds_out_a_tenth_and_every_variant_renders() -> None:
    from autoexec_dagster.experiments.variant_channel import VariantChannel

    day = DAYS[0]
    sends = next_sends(click_insight(generate_campaign_metrics(day)), day)
    playbook = Playbook.from_yaml(CAMPAIGN_PLAYBOOK_PATH)
    plan = route(sends, playbook, insight_name="campaign_sends", partition_key=day.isoformat())
    decisions = plan["decision"].astype(str).value_counts().to_dict()
    assert set(decisions) == {"act", "holdout"}
    assert 0.07 <= decisions["holdout"] / len(plan) <= 0.13
    channel = campaign_channels(smtp_port=2525, tracking_url="http://127.0.0.1:9")["campaign_email"]
    experiment = playbook.rules[0].experiment
    assert experiment is not None
    wrapped = VariantChannel.wrap(channel, experiment, action="campaign_email")
    # Validation renders each variant with placeholder links; the real ones are signed per email.
    wrapped.validate_rows(plan[plan["decision"].astype(str) == "act"].head(50))
    token = sign_token(SECRET, recipient_id="r", campaign_id="c", idempotency_key="k")
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)


def test_the_uplift_check_words_a_lift_over_a_holdout_that_never_clicks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request

    from autoexec_dagster import ActionLedger
    from autoexec_dagster.dagster.defs_factory import build_execution_defs
    from resources.local_servers import SmtpSink
    from sensors.campaigns import campaign_day_job, campaign_tracking_job

    day = "2026-11-03"
    now = [dt.datetime(2026, 11, 3, 8, 0, tzinfo=dt.UTC)]

    def clock() -> dt.datetime:
        return now[0]

    book = Playbook.from_yaml(CAMPAIGN_PLAYBOOK_PATH)
    rule = book.rules[0]
    assert rule.experiment is not None
    # Small enough for a unit test: the uplift judges with five recipients a side.
    small = rule.experiment.model_copy(update={"min_samples_per_variant": 5})
    book = book.model_copy(update={"rules": [rule.model_copy(update={"experiment": small})]})
    db = tmp_path / "tracking.sqlite"
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}", clock=clock)
    with SmtpSink() as sink, TrackingServer(SECRET, db, clock=clock) as tracker:
        execution = build_execution_defs(
            insight=campaign_sends,
            playbook=book,
            channels=campaign_channels(smtp_port=sink.port, tracking_url=tracker.url),
            ledger=ledger,
            outcomes=campaign_outcomes,
        )
        defs = dg.Definitions.merge(
            dg.Definitions(
                assets=[
                    campaign_metrics,
                    campaign_click_insight,
                    campaign_sends,
                    campaign_outcomes,
                ],
                jobs=[campaign_day_job, campaign_tracking_job],
            ),
            execution,
        )
        instance = dg.DagsterInstance.ephemeral()
        monkeypatch.setenv("CAMPAIGN_TRACKING_SECRET", SECRET)
        try:
            config = {"ops": {"campaign_sends": {"config": {"send_size": 10}}}}
            for job, run_config in (
                ("campaign_day_job", config),
                ("campaign_optimisation_execution_job", {}),
            ):
                result = defs.resolve_job_def(job).execute_in_process(
                    partition_key=day, instance=instance, run_config=run_config
                )
                assert result.success
            actions = ledger.actions(playbook="campaign_optimisation", states=["succeeded"])
            now[0] += dt.timedelta(hours=1)
            # A third of the mailed recipients click their email's link.
            for record in actions.head(len(actions) // 3).to_dict("records"):
                token = sign_token(
                    SECRET,
                    recipient_id=str(record["entity_id"]),
                    campaign_id=str(record["entity_id"])[:7],
                    idempotency_key=str(record["idempotency_key"]),
                )
                request = urllib.request.Request(f"{tracker.url}/c/{token}")
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert response.status == 200
            outcomes_config = {"ops": {"campaign_outcomes": {"config": {"tracking_db": str(db)}}}}
            collected = defs.resolve_job_def("campaign_tracking_job").execute_in_process(
                partition_key=day, instance=instance, run_config=outcomes_config
            )
            assert collected.success
            now[0] += dt.timedelta(hours=1)
            update = defs.resolve_job_def("campaign_optimisation_outcomes_job").execute_in_process(
                partition_key=day, instance=instance
            )
        finally:
            ledger.dispose()
    (check,) = update.get_asset_check_evaluations()
    assert check.check_name == "campaign_optimisation_uplift"
    assert "effect" in (check.description or "")
    assert "nan" not in (check.description or "")


def test_the_deployment_registers_the_campaign_story_with_its_sensors_stopped() -> None:
    from definitions import build_defs

    defs = build_defs()
    keys = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    assert {
        "campaign_metrics",
        "campaign_click_insight",
        "campaign_sends",
        "campaign_outcomes",
        "campaign_optimisation/plan",
        "campaign_optimisation/actions",
        "campaign_optimisation/experiment",
        "campaign_optimisation/learnings",
        "campaign_optimisation/uplift",
    } <= keys
    for job in (
        "campaign_day_job",
        "campaign_tracking_job",
        "campaign_optimisation_execution_job",
        "campaign_optimisation_outcomes_job",
    ):
        assert defs.resolve_job_def(job).name == job
    for name in ("campaign_optimisation_sensor", "campaign_optimisation_outcomes_sensor"):
        sensor = defs.resolve_sensor_def(name)
        # Switching them on mails the recipients of every new day: a decision, not a default.
        assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
