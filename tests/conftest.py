"""Shared fixtures: real databases for the ledger, small playbooks and insights."""

import contextlib
import os
import uuid
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from autoexec_dagster.playbook import Guardrails, Playbook, Rule

PG_ADMIN_URL = os.environ.get("AUTOEXEC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _postgres_unavailable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {str(exc).splitlines()[0]}"


@pytest.fixture(scope="session")
def postgres_admin() -> str:
    """The admin URL of the local PostgreSQL server, or skip with the reason it is unusable."""
    reason = _postgres_unavailable()
    if reason:
        pytest.skip(reason)
    return PG_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_admin: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"autoexec_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with (
            psycopg.connect(postgres_admin, autocommit=True) as conn,
            contextlib.suppress(Exception),
        ):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The ledger URL for each supported backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")


def count_true(mask: "pd.Series | np.ndarray") -> int:
    """How many entries of a boolean mask are true, as an int."""
    values = mask.to_numpy() if isinstance(mask, pd.Series) else mask
    return int(np.count_nonzero(values))


def churn_playbook(**guardrails: object) -> Playbook:
    """The issue's example playbook."""
    return Playbook(
        name="churn_outreach",
        entity_key="customer_id",
        rules=[
            Rule(
                name="vip_at_risk",
                when="churn_score >= 0.7 and lifetime_value >= 5000",
                escalate="High-value customer at risk: an account manager should call",
            ),
            Rule(
                name="unsure",
                when="churn_score >= 0.6 and confidence < 0.2",
                escalate="The model is unsure about this customer",
            ),
            Rule(name="at_risk", when="churn_score >= 0.7", action="retention_email"),
            Rule(name="watch", when="churn_score >= 0.5", action="crm_task"),
        ],
        guardrails=Guardrails(**guardrails),  # type: ignore[arg-type]
    )


def churn_scores(n: int = 1_000, *, seed: int = 7) -> pd.DataFrame:
    """Model output with plausible columns; about 40% of customers are flagged."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "customer_id": [f"C{i:06d}" for i in range(n)],
            "name": [f"Customer {i}" for i in range(n)],
            "email": [f"customer{i}@example.com" for i in range(n)],
            "churn_score": rng.random(n).round(4),
            "confidence": rng.random(n).round(4),
            "lifetime_value": (rng.random(n) * 10_000).round(2),
        }
    )
