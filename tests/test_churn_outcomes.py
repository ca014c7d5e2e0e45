"""The churn story's outcomes and experiment: simulated outcomes with known true effects, the
playbook's retention_offer experiment and its 10% holdout, executed against the real SMTP sink."""

import datetime as dt
import email.utils
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from assets import churn_outcomes
from assets.customers import (
    BASELINE_RETENTION,
    BASELINE_UNSUBSCRIBE,
    HOLDOUT_ARM,
    OUTCOME_COLUMNS,
    OUTCOME_WINDOW_DAYS,
    TREATED_ARM,
    TRUE_RETENTION_LIFT,
    TRUE_UNSUBSCRIBE_RATE,
    generate_customers,
    generate_training_snapshot,
    outcome_delay_days,
    score_customers,
    simulate_churn_outcomes,
    train_churn_model,
    true_rates,
)
from autoexec_dagster import ActionLedger, Playbook, execute_plan, route, update_experiment
from autoexec_dagster.channels.templates import compile_template, render
from autoexec_dagster.experiments.experiment import check_variant_fields
from autoexec_dagster.experiments.variant_channel import VariantChannel
from resources import CHURN_PLAYBOOK_PATH
from resources.channels import CRM_SECRET_ENV, churn_channels
from resources.local_receivers import CrmReceiver, SmtpSink
from tests.e2e_support import SECRET

EXPOSED_ON = dt.date(2026, 11, 10)
ARMS = (
    ("retention_email", HOLDOUT_ARM),
    ("retention_email", "check_in"),
    ("retention_email", "discount_20"),
    ("retention_email", "free_month"),
    ("crm_task", HOLDOUT_ARM),
    ("crm_task", TREATED_ARM),
)
WINDOW = pd.Timedelta(days=OUTCOME_WINDOW_DAYS)
# The days any outcome of an exposure on EXPOSED_ON can fall on, and one either side.
OUTCOME_DAYS = tuple(EXPOSED_ON + dt.timedelta(days=i) for i in range(-1, OUTCOME_WINDOW_DAYS + 2))
# Two consecutive churn_scores days; small populations keep the SMTP part to seconds.
RUN_DAYS = ("2026-11-10", "2026-11-11")
RUN_CUSTOMERS = 12_000
TRAINING_CUSTOMERS = 4_000


def _exposures(n_per_arm: int, *, seed: int = 1, day: dt.date = EXPOSED_ON) -> pd.DataFrame:
    """Exposures as the ledger returns them: ``n_per_arm`` customers per arm, at random times of
    ``day``."""
    rng = np.random.default_rng(seed)
    n = n_per_arm * len(ARMS)
    seconds = rng.integers(0, 86_400, size=n)
    return pd.DataFrame(
        {
            "entity_id": [f"C{i:07d}" for i in range(n)],
            "action": [action for action, _ in ARMS for _ in range(n_per_arm)],
            "partition_key": day.isoformat(),
            "arm": [arm for _, arm in ARMS for _ in range(n_per_arm)],
            "experiment": "",
            "exposed_at": pd.Timestamp(day, tz="UTC") + pd.to_timedelta(seconds, unit="s"),
        }
    )


def _all_days(exposures: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(
        [simulate_churn_outcomes(exposures, day) for day in OUTCOME_DAYS], ignore_index=True
    )


def test_outcomes_are_deterministic_and_do_not_depend_on_the_other_customers() -> None:
    exposures = _exposures(500)
    outcomes = _all_days(exposures)
    assert tuple(outcomes.columns) == OUTCOME_COLUMNS
    assert str(outcomes["occurred_at"].dtype) == "datetime64[ns, UTC]"
    assert outcomes["retained"].dtype == np.int64 and outcomes["unsubscribed"].dtype == np.int64
    pd.testing.assert_frame_equal(outcomes, _all_days(exposures))

    # The ledger's order and the other customers of the frame change nothing.
    shuffled = _all_days(exposures.sample(frac=1.0, random_state=5))
    key = ["customer_id"]
    pd.testing.assert_frame_equal(
        shuffled.sort_values(key, ignore_index=True), outcomes.sort_values(key, ignore_index=True)
    )
    some = exposures["entity_id"].iloc[::7]
    alone = _all_days(exposures[exposures["entity_id"].isin(some)])
    pd.testing.assert_frame_equal(
        alone.sort_values(key, ignore_index=True),
        outcomes[outcomes["customer_id"].isin(some)].sort_values(key, ignore_index=True),
    )
    assert simulate_churn_outcomes(exposures.iloc[:0], EXPOSED_ON).empty


def test_each_customer_has_one_outcome_inside_the_window_decided_by_its_first_exposure() -> None:
    exposures = _exposures(300)
    outcomes = _all_days(exposures)
    assert outcomes["customer_id"].is_unique
    assert set(outcomes["customer_id"]) == set(exposures["entity_id"])
    joined = outcomes.merge(exposures, left_on="customer_id", right_on="entity_id")
    lag = joined["occurred_at"] - joined["exposed_at"]
    assert bool((lag > pd.Timedelta(0)).all()) and bool((lag < WINDOW).all())
    delays = outcome_delay_days(exposures["entity_id"])
    assert set(delays.tolist()) == set(range(1, OUTCOME_WINDOW_DAYS + 1))
    # Every outcome is on the day it was emitted for, and only that day emitted it.
    for day in OUTCOME_DAYS:
        emitted = simulate_churn_outcomes(exposures, day)
        assert bool((emitted["occurred_at"].dt.date == day).all())

    # Later exposures (a holdout customer flagged again, an email after a CRM task) add no second
    # outcome and do not change the first one's.
    later = exposures.assign(
        exposed_at=exposures["exposed_at"] + pd.Timedelta(days=3),
        arm=np.where(exposures["arm"] == HOLDOUT_ARM, HOLDOUT_ARM, "discount_20"),
        action="retention_email",
    )
    pd.testing.assert_frame_equal(
        _all_days(pd.concat([later, exposures], ignore_index=True)), outcomes
    )


def test_unknown_arm_is_refused_rather_than_guessed() -> None:
    exposures = _exposures(5).assign(arm="surprise_gift")
    with pytest.raises(ValueError, match="no true effect is documented"):
        _all_days(exposures)
    assert true_rates("crm_task", HOLDOUT_ARM) == (BASELINE_RETENTION, BASELINE_UNSUBSCRIBE)


def test_simulated_effects_match_the_documented_truth() -> None:
    n = 25_000
    exposures = _exposures(n, seed=2)
    outcomes = _all_days(exposures).merge(
        exposures[["entity_id", "action", "arm"]], left_on="customer_id", right_on="entity_id"
    )
    assert len(outcomes) == n * len(ARMS)
    rates: dict[tuple[str, str], tuple[float, float]] = {}
    for action, arm in ARMS:
        mine = outcomes[(outcomes["action"] == action) & (outcomes["arm"] == arm)]
        assert len(mine) == n
        rates[(action, arm)] = (float(mine["retained"].mean()), float(mine["unsubscribed"].mean()))
    for (action, arm), (retained, unsubscribed) in rates.items():
        p, q = true_rates(action, arm)
        # Four standard errors: a false alarm about once in 16,000 checks.
        assert abs(retained - p) < 4 * np.sqrt(p * (1 - p) / n), (action, arm, retained, p)
        assert abs(unsubscribed - q) < 4 * np.sqrt(q * (1 - q) / n), (action, arm, unsubscribed)
    for (action, arm), lift in TRUE_RETENTION_LIFT.items():
        if (action, arm) not in rates:
            continue
        measured = rates[(action, arm)][0] - rates[(action, HOLDOUT_ARM)][0]
        standard_error = np.sqrt(2 * 0.25 / n)
        assert abs(measured - lift) < 4 * standard_error, (action, arm, measured, lift)
    # The ranking the experiment should find: discount_20 > free_month > check_in > holdout.
    ranked = ["discount_20", "free_month", "check_in", HOLDOUT_ARM]
    retained_by_arm = [rates[("retention_email", arm)][0] for arm in ranked]
    assert retained_by_arm == sorted(retained_by_arm, reverse=True)


def test_playbook_runs_the_retention_offer_experiment_with_a_holdout() -> None:
    playbook = Playbook.from_yaml(CHURN_PLAYBOOK_PATH)
    assert playbook.guardrails.holdout_fraction == pytest.approx(0.1)
    assert playbook.outcome is not None and playbook.outcome.metric == "retained"
    assert playbook.outcome.window == dt.timedelta(days=OUTCOME_WINDOW_DAYS)
    experiments = playbook.experiments()
    assert list(experiments) == ["retention_offer"]
    rule, experiment = experiments["retention_offer"]
    assert rule.name == "at_risk" and rule.action == "retention_email"
    assert sorted(experiment.variants) == ["check_in", "discount_20", "free_month"]
    assert experiment.control == "check_in" and experiment.allocation == "thompson"
    assert experiment.metric == "retained" and experiment.window == dt.timedelta(days=14)
    assert experiment.min_samples_per_variant == 300 and experiment.min_days == 3
    assert experiment.promote_when.probability_best == 0.95
    assert experiment.promote_when.expected_loss == 0.005
    assert experiment.guardrails == {"unsubscribed": 0.02}
    # The outcome asset emits every column the experiment and the outcome metric read, and the
    # simulation documents a true effect for every variant, each below the guardrail.
    assert set(experiment.outcome_columns()) <= set(OUTCOME_COLUMNS)
    for variant in experiment.variants:
        assert ("retention_email", variant) in TRUE_RETENTION_LIFT
        assert TRUE_UNSUBSCRIBE_RATE[("retention_email", variant)] < 0.02

    channel = churn_channels(smtp_port=2525, crm_url="http://127.0.0.1:9/tasks")["retention_email"]
    check_variant_fields(experiment, channel, action="retention_email")
    for overrides in experiment.variants.values():
        assert set(overrides) == {"subject", "template"}
    # Every variant renders for real customers (the library renders each before sending).
    customers = generate_customers(200, seed=3, as_of=EXPOSED_ON)
    VariantChannel.wrap(channel, experiment, action="retention_email").validate_rows(customers)
    subjects = {
        _subject(experiment.variants[v]["subject"], customers.iloc[0]) for v in experiment.variants
    }
    assert len(subjects) == len(experiment.variants)


def _subject(template: str, customer: pd.Series) -> str:
    return render(
        compile_template(template, what="subject"),
        {
            "name": customer["name"],
            "plan": customer["plan"],
            "customer_id": customer["customer_id"],
        },
        what="subject",
    )


class DayClock:
    """The ledger's clock: the morning of the day being executed, as a daily run would see it."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 1, 9, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def set_day(self, day: str) -> None:
        """Move to 09:00 UTC of ``day``."""
        self.now = dt.datetime.fromisoformat(day).replace(hour=9, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def churn_model() -> Any:
    model, _ = train_churn_model(generate_training_snapshot(TRAINING_CUSTOMERS))
    return model


@pytest.fixture(scope="module")
def executed(
    churn_model: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Two days of the real playbook executed through the real channels into an SMTP sink and
    the CRM receiver, with the ledger's clock on each day."""
    folder = tmp_path_factory.mktemp("churn_outcomes")
    playbook = Playbook.from_yaml(CHURN_PLAYBOOK_PATH)
    clock = DayClock()
    url = f"sqlite:///{folder / 'ledger.db'}"
    ledger = ActionLedger(url, clock=clock)
    plans, scores = {}, {}
    with (
        pytest.MonkeyPatch.context() as env,
        SmtpSink() as sink,
        CrmReceiver(SECRET, folder / "crm.sqlite") as crm,
    ):
        env.setenv(CRM_SECRET_ENV, SECRET)
        channels = churn_channels(smtp_port=sink.port, crm_url=crm.url)
        for day in RUN_DAYS:
            clock.set_day(day)
            customers = generate_customers(
                RUN_CUSTOMERS, seed=2026, as_of=dt.date.fromisoformat(day)
            )
            scores[day] = score_customers(churn_model, customers)
            plans[day] = route(
                scores[day], playbook, partition_key=day, insight_name="churn_scores"
            )
            report = execute_plan(plans[day], playbook=playbook, ledger=ledger, channels=channels)
            assert report.failed == 0, report.as_dict()
        messages = list(sink.messages)
    try:
        yield {
            "ledger": ledger,
            "url": url,
            "clock": clock,
            "playbook": playbook,
            "plans": plans,
            "scores": scores,
            "messages": messages,
        }
    finally:
        ledger.dispose()


def test_each_email_carries_the_variant_the_ledger_recorded(executed: dict[str, Any]) -> None:
    ledger: ActionLedger = executed["ledger"]
    _rule, experiment = executed["playbook"].experiments()["retention_offer"]
    actions = ledger.actions(playbook="churn_outreach")
    emails = actions[(actions["action"] == "retention_email") & (actions["state"] == "succeeded")]
    assert emails["entity_id"].is_unique and len(emails) > 300
    assert set(emails["variant"]) == set(experiment.variants)
    variant_of = dict(zip(emails["entity_id"], emails["variant"], strict=True))
    customers = pd.concat(executed["scores"].values()).drop_duplicates("customer_id")
    by_address = customers.set_index("email")

    messages = executed["messages"]
    assert len(messages) == len(emails)
    seen = set()
    for mail in messages:
        (address,) = mail.recipients
        customer = by_address.loc[address]
        variant = variant_of[str(customer["customer_id"])]
        expected = _subject(experiment.variants[variant]["subject"], customer)
        assert mail.message["Subject"] == expected
        assert str(customer["customer_id"]) in mail.message.get_payload()
        seen.add(str(customer["customer_id"]))
        assert email.utils.parseaddr(mail.message["To"])[1] == address
    assert seen == set(variant_of)

    # The exposures the outcomes join to name the same arm as the email that went out.
    exposures = ledger.exposures_frame("churn_outreach", action="retention_email")
    sent = exposures[exposures["arm"] != HOLDOUT_ARM]
    assert dict(zip(sent["entity_id"], sent["arm"], strict=True)) == variant_of


def test_a_tenth_is_held_out_and_the_same_customers_on_every_day(executed: dict[str, Any]) -> None:
    plans: dict[str, pd.DataFrame] = executed["plans"]
    would_act = {}
    for day, plan in plans.items():
        decision = plan.set_index("entity_id")["decision"].astype(str)
        candidates = decision[decision.isin(["act", "holdout"])]
        share = float((candidates == "holdout").mean())
        assert 0.06 <= share <= 0.14, (day, share, len(candidates))
        would_act[day] = candidates == "holdout"
    first, second = would_act[RUN_DAYS[0]], would_act[RUN_DAYS[1]]
    both = first.index.intersection(second.index)
    assert len(both) > 100 and int(first[both].sum()) > 5
    assert first[both].equals(second[both])

    # Held-out customers got nothing and are recorded as the control group.
    ledger: ActionLedger = executed["ledger"]
    actions = ledger.actions(playbook="churn_outreach")
    held = set(actions.loc[actions["state"] == "held_out", "entity_id"])
    assert held == set(first[first].index) | set(second[second].index)
    sent = set(actions.loc[actions["state"] == "succeeded", "entity_id"])
    assert not held & sent
    exposures = ledger.exposures_frame("churn_outreach")
    assert set(exposures.loc[exposures["arm"] == HOLDOUT_ARM, "entity_id"]) == held


def _materialize_outcomes(url: str, days: list[str]) -> dict[str, pd.DataFrame]:
    out = {}
    with dg.DagsterInstance.ephemeral() as instance:
        for day in days:
            result = dg.materialize(
                [churn_outcomes],
                instance=instance,
                partition_key=day,
                run_config={"ops": {"churn_outcomes": {"config": {"ledger_url": url}}}},
            )
            assert result.success
            out[day] = result.output_for_node("churn_outcomes")
    return out


@pytest.fixture(scope="module")
def outcome_days(executed: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """churn_outcomes of every day an outcome of the run can fall on, and one more."""
    start = dt.date.fromisoformat(RUN_DAYS[0])
    days = [(start + dt.timedelta(days=i)).isoformat() for i in range(OUTCOME_WINDOW_DAYS + 2)]
    return _materialize_outcomes(executed["url"], days)


def test_outcome_asset_emits_each_exposed_customer_once(
    executed: dict[str, Any], outcome_days: dict[str, pd.DataFrame]
) -> None:
    ledger: ActionLedger = executed["ledger"]
    every = pd.concat(outcome_days.values(), ignore_index=True)
    exposures = ledger.exposures_frame("churn_outreach")
    assert every["customer_id"].is_unique
    assert set(every["customer_id"]) == set(exposures["entity_id"])
    first = exposures.groupby("entity_id")["exposed_at"].min()
    lag = every["occurred_at"] - every["customer_id"].map(first)
    assert bool((lag > pd.Timedelta(0)).all()) and bool((lag < WINDOW).all())
    for day, frame in outcome_days.items():
        assert bool((frame["occurred_at"].dt.date == dt.date.fromisoformat(day)).all())
    # A re-materialization reads the same ledger and emits the same outcomes.
    days = list(outcome_days)[3:5]
    for day, frame in _materialize_outcomes(executed["url"], days).items():
        pd.testing.assert_frame_equal(frame, outcome_days[day])


def test_the_experiment_reads_the_outcomes_of_the_run(
    executed: dict[str, Any], outcome_days: dict[str, pd.DataFrame]
) -> None:
    ledger: ActionLedger = executed["ledger"]
    playbook: Playbook = executed["playbook"]
    outcomes = pd.concat(outcome_days.values(), ignore_index=True)
    executed["clock"].set_day(list(outcome_days)[-1])
    result = update_experiment(playbook=playbook, ledger=ledger, outcomes=outcomes)
    assert result.experiment == "retention_offer" and result.control == "check_in"
    assert result.outcomes_added > 0
    # A customer first given a CRM task and emailed on a later day has its one outcome dated
    # from the task: for the experiment it came before the exposure, and the library says so.
    counted = ledger.exposures_frame("churn_outreach", experiment="retention_offer")
    emailed_at = counted.groupby("entity_id")["exposed_at"].min()
    dated = outcomes[outcomes["customer_id"].isin(emailed_at.index)]
    early = dated["occurred_at"] < dated["customer_id"].map(emailed_at)
    assert result.outcomes_before_exposure == int(early.sum())
    assert result.open_windows == 0.0
    variants = result.variants.set_index("variant")
    assert set(variants.index) == {"check_in", "discount_20", "free_month"}
    treated = counted[counted["arm"] != HOLDOUT_ARM]
    assert int(variants["n"].sum()) == treated["entity_id"].nunique()
    assert result.holdout_n == counted.loc[counted["arm"] == HOLDOUT_ARM, "entity_id"].nunique()
    # Under 300 customers per variant: too early to promote anything.
    assert int(variants["n"].max()) < 300
    assert result.status == "running" and result.winner is None and not result.promoted_now

    again = update_experiment(playbook=playbook, ledger=ledger, outcomes=outcomes)
    assert again.outcomes_added == 0
    assert again.variants["n"].tolist() == result.variants["n"].tolist()


def test_the_outcomes_job_updates_the_experiment_in_the_asset_graph(
    executed: dict[str, Any], outcome_days: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    from definitions import build_defs
    from sensors import build_churn_execution_defs

    channels = churn_channels(smtp_port=2525, crm_url="http://127.0.0.1:9/tasks")
    defs = build_defs(build_churn_execution_defs(channels=channels, ledger=executed["ledger"]))
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {f"churn_outreach/{name}" for name in ("experiment", "learnings", "uplift")} <= keys
    assert defs.resolve_sensor_def("churn_outreach_outcomes_sensor") is not None
    day = list(outcome_days)[-3]
    config = {"ops": {"churn_outcomes": {"config": {"ledger_url": executed["url"]}}}}
    with dg.DagsterInstance.ephemeral(tempdir=str(tmp_path)) as instance:
        stored = dg.materialize(
            [churn_outcomes], instance=instance, partition_key=day, run_config=config
        )
        assert stored.success
        run = defs.resolve_job_def("churn_outreach_outcomes_job").execute_in_process(
            partition_key=day, instance=instance
        )
        assert run.success
        by_key = {
            event.materialization.asset_key.to_user_string(): event.materialization
            for event in run.get_asset_materialization_events()
        }
    experiment = by_key["churn_outreach/experiment"].metadata
    assert experiment["status"].value == "running"
    for variant in ("check_in", "discount_20", "free_month"):
        assert int(experiment[f"n/{variant}"].value) > 0  # pyright: ignore[reportArgumentType]
    assert "retention_offer" in str(by_key["churn_outreach/learnings"].metadata["learnings"].value)
    assert "churn_outreach/uplift" in by_key


def test_churn_execution_defs_resolve_on_their_own(tmp_path: Path) -> None:
    from sensors import build_churn_execution_defs

    channels = churn_channels(smtp_port=2525, crm_url="http://127.0.0.1:9/tasks")
    defs = build_churn_execution_defs(channels=channels, ledger=f"sqlite:///{tmp_path / 'l.db'}")
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "churn_outreach/experiment" in keys
