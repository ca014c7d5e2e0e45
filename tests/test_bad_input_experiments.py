"""Bad input for experiments: each refused with a clear message and no side effect.

The issue's list: a metric the outcomes lack or that is not numeric; a variant overriding a field
the channel does not have; weights that do not sum to 1; an unknown control; an unparsable window;
outcome rows duplicated on (entity, time); two experiments on one action at once; changing an
experiment's variants while it runs.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from autoexec_dagster import (
    ActionLedger,
    ActionRequest,
    ExperimentError,
    Playbook,
    PlaybookError,
    PythonChannel,
    build_execution_defs,
    execute_plan,
    route,
    update_experiment,
)
from autoexec_dagster.ledger import schema

PARTITION = "2026-11-24"


def variants(**extra: Any) -> dict[str, dict[str, Any]]:
    return {"a": {"permanent_errors": ["A"]}, "b": {"permanent_errors": ["B"]}, **extra}


def experiment(**fields: Any) -> dict[str, Any]:
    return {"name": "offer_test", "variants": variants(), "control": "a", "metric": "m", **fields}


def book(exp: dict[str, Any] | None = None, *, rules: list[dict[str, Any]] | None = None) -> Any:
    data = {
        "name": "exp_bad",
        "entity_key": "customer_id",
        "rules": rules
        or [{"name": "everyone", "when": "score >= 0", "action": "offer", "experiment": exp}],
        "guardrails": {"max_flagged_fraction": 1.0, "holdout_fraction": 0.2},
    }
    return Playbook.from_dict(data, source="test playbook")


def insight(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame({"customer_id": [f"c{i}" for i in range(n)], "score": 0.9})


class Sent:
    def __init__(self) -> None:
        self.requests: list[ActionRequest] = []

    def __call__(self, request: ActionRequest) -> str:
        self.requests.append(request)
        return "ok"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ActionLedger]:
    led = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.dispose()


def rows(ledger: ActionLedger, table: sa.Table) -> int:
    with ledger.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def nothing_written(ledger: ActionLedger) -> bool:
    return all(
        rows(ledger, t) == 0
        for t in (
            schema.actions,
            schema.experiments,
            schema.experiment_assignments,
            schema.exposures,
            schema.outcomes,
        )
    )


def run(playbook: Playbook, ledger: ActionLedger, sent: Sent | None = None) -> Any:
    return execute_plan(
        route(insight(), playbook, partition_key=PARTITION),
        playbook=playbook,
        ledger=ledger,
        channels={"offer": PythonChannel.from_callable(sent or Sent())},
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"allocation": "fixed", "weights": {"a": 0.5, "b": 0.4}}, "weights must sum to 1"),
        ({"allocation": "fixed", "weights": {"a": 0.5, "c": 0.5}}, "weights must name each"),
        ({"allocation": "fixed"}, "fixed allocation needs weights"),
        ({"control": "c"}, "control 'c' is not a variant"),
        ({"window": "two weeks"}, "is not a duration"),
        ({"window": "-3d"}, "is not a duration"),
        ({"variants": {"a": {}}}, "at least 2"),
        ({"variants": variants(c={"max_attempts": 1})}, "overrides delivery setting"),
    ],
)
def test_an_invalid_experiment_is_refused_when_the_playbook_loads(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(PlaybookError, match=message):
        book(experiment(**fields))


def test_two_experiments_on_one_action_in_a_playbook_are_refused() -> None:
    rules = [
        {"name": "high", "when": "score >= 0.8", "action": "offer", "experiment": experiment()},
        {
            "name": "low",
            "when": "score >= 0",
            "action": "offer",
            "experiment": experiment(name="other_test"),
        },
    ]
    with pytest.raises(PlaybookError, match="two experiments on action 'offer' at once"):
        book(rules=rules)


def test_an_experiment_needs_an_action() -> None:
    rules = [{"name": "r", "when": "score >= 0", "escalate": "look", "experiment": experiment()}]
    with pytest.raises(PlaybookError, match="an experiment varies an action"):
        book(rules=rules)


def test_a_variant_overriding_a_field_the_channel_lacks_is_refused_before_anything(
    ledger: ActionLedger,
) -> None:
    playbook = book(experiment(variants=variants(c={"subject": "Hello"})))
    sent = Sent()
    with pytest.raises(ExperimentError, match=r"variant 'c' overrides field\(s\) \['subject'\]"):
        run(playbook, ledger, sent)
    assert sent.requests == [] and nothing_written(ledger)
    with pytest.raises(ExperimentError, match="does not have"):
        build_execution_defs(
            insight="scores",
            playbook=playbook,
            ledger=ledger,
            channels={"offer": PythonChannel.from_callable(sent)},
        )


def test_a_variant_value_the_field_refuses_is_refused(ledger: ActionLedger) -> None:
    playbook = book(experiment(variants=variants(c={"permanent_errors": "not a list"})))
    with pytest.raises(ExperimentError, match="variant 'c' sets permanent_errors="):
        run(playbook, ledger)
    assert nothing_written(ledger)


def outcomes(**columns: Any) -> pd.DataFrame:
    data: dict[str, Any] = {
        "customer_id": ["c1", "c2", "c3"],
        "occurred_at": pd.to_datetime(["2026-11-25"] * 3, utc=True),
        "m": [1, 0, 1],
    }
    data.update(columns)
    return pd.DataFrame(data)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (outcomes().drop(columns="m"), r"lack column\(s\) \['m'\]"),
        (outcomes(m=["yes", "no", "yes"]), "metric 'm' must be numeric"),
        (outcomes(m=[1.0, None, 0.0]), "metric 'm' holds 1 missing value"),
        (outcomes().drop(columns="occurred_at"), r"lack column\(s\) \['occurred_at'\]"),
        (outcomes(occurred_at=["yesterday", "x", "y"]), "'occurred_at' holds a value that is not"),
        (
            outcomes(customer_id=["c1", "c1", "c2"]).assign(
                occurred_at=pd.to_datetime(["2026-11-25"] * 3, utc=True)
            ),
            r"2 outcome rows repeat on \(entity, occurred_at\)",
        ),
        ("not a frame", "must be a pandas DataFrame"),
    ],
)
def test_bad_outcomes_are_refused_and_nothing_is_stored(
    ledger: ActionLedger, frame: Any, message: str
) -> None:
    playbook = book(experiment())
    run(playbook, ledger)
    before = (rows(ledger, schema.experiment_events), rows(ledger, schema.outcomes))
    with pytest.raises(ExperimentError, match=message):
        update_experiment(playbook=playbook, ledger=ledger, outcomes=frame)
    assert rows(ledger, schema.outcomes) == 0
    assert (rows(ledger, schema.experiment_events), rows(ledger, schema.outcomes)) == before


def test_changing_the_variants_of_a_running_experiment_is_refused(ledger: ActionLedger) -> None:
    run(book(experiment()), ledger)
    sent_before = rows(ledger, schema.actions)
    changed = book(experiment(variants=variants(c={"permanent_errors": ["C"]})))
    sent = Sent()
    with pytest.raises(ExperimentError, match="give the changed experiment a new name"):
        execute_plan(
            route(insight(60), changed, partition_key="2026-11-25"),
            playbook=changed,
            ledger=ledger,
            channels={"offer": PythonChannel.from_callable(sent)},
        )
    assert sent.requests == [] and rows(ledger, schema.actions) == sent_before
    with pytest.raises(ExperimentError, match="new name"):
        update_experiment(playbook=changed, ledger=ledger, outcomes=outcomes())
    assert rows(ledger, schema.outcomes) == 0


def test_a_second_experiment_on_an_action_whose_experiment_runs_is_refused(
    ledger: ActionLedger,
) -> None:
    run(book(experiment()), ledger)
    actions_before = rows(ledger, schema.actions)
    second = book(experiment(name="next_test"))
    sent = Sent()
    with pytest.raises(ExperimentError, match="'offer_test' still runs on action 'offer'"):
        execute_plan(
            route(insight(60), second, partition_key="2026-11-25"),
            playbook=second,
            ledger=ledger,
            channels={"offer": PythonChannel.from_callable(sent)},
        )
    assert sent.requests == [] and rows(ledger, schema.actions) == actions_before
