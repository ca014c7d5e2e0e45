"""Shared by the bad-input corpora: a real run over a tiny insight, and what the ledger holds.

Each corpus drives a channel through :func:`execute_plan` (validation, reservation, sending)
against a real destination and a real SQLite ledger, so "refused with no side effect" is checked
where it matters: the destination saw nothing and the ledger holds no reserved or sent row.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import sqlalchemy as sa

from autoexec_dagster import ActionLedger, Channel, ExecutionReport, execute_plan, route
from autoexec_dagster.ledger import schema
from autoexec_dagster.playbook import Guardrails, Playbook, Rule
from tests.reliability import record

ACTION = "notify"
PARTITION = "2026-11-24"
# States that mean a side effect happened or may still happen.
LIVE_STATES = (schema.RESERVED, schema.SENDING, schema.SUCCEEDED, schema.IN_DOUBT)


def playbook() -> Playbook:
    """Every customer gets the one action; nothing is escalated or held out."""
    return Playbook(
        name="bad_input",
        entity_key="customer_id",
        rules=[Rule(name="everyone", when="churn_score >= 0", action=ACTION)],
        guardrails=Guardrails(max_flagged_fraction=1.0),
    )


def insight(**columns: list[object]) -> pd.DataFrame:
    """Two customers with the usual columns, overridden or extended by ``columns``."""
    data: dict[str, list[object]] = {
        "customer_id": ["C1", "C2"],
        "name": ["Ann", "Bob"],
        "email": ["ann@example.com", "bob@example.com"],
        "churn_score": [0.9, 0.8],
    }
    data.update(columns)
    return pd.DataFrame(data)


def run(
    channel: Channel, ledger: ActionLedger, frame: pd.DataFrame | None = None
) -> ExecutionReport:
    """Route the insight and execute the plan through ``channel``."""
    book = playbook()
    plan = route(insight() if frame is None else frame, book, partition_key=PARTITION)
    return execute_plan(plan, playbook=book, ledger=ledger, channels={ACTION: channel})


def action_states(ledger: ActionLedger) -> list[str]:
    """The state of every action row in the ledger."""
    with ledger.engine.connect() as conn:
        return [row.state for row in conn.execute(sa.select(schema.actions.c.state))]


def live_rows(ledger: ActionLedger) -> list[str]:
    """States of rows that were (or may be) sent: must be empty after a refusal."""
    return [state for state in action_states(ledger) if state in LIVE_STATES]


class Corpus:
    """Counts the cases of one group and records them once, when the module's tests are done."""

    def __init__(self, group: str):
        self.group = group
        self.cases = 0
        self.refused = 0
        self.side_effects = 0

    @contextmanager
    def case(self) -> Iterator[None]:
        """One case: counted as refused only if its assertions pass."""
        self.cases += 1
        yield
        self.refused += 1

    def record(self) -> None:
        """Append the group's figures; a case whose assertions failed counts as a side effect."""
        if self.cases:
            record(
                "bad_input",
                group=self.group,
                cases=self.cases,
                refused=self.refused,
                side_effects=self.cases - self.refused,
            )


@contextmanager
def corpus_fixture(group: str) -> Iterator[Corpus]:
    """Body of a module-scoped fixture that records the group's figures at teardown."""
    corpus = Corpus(group)
    try:
        yield corpus
    finally:
        corpus.record()
