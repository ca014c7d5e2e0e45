"""Nothing secret or personal leaks: a real Dagster run over real SMTP (with login) and signed
webhooks, then every place the run wrote is searched for the secrets and the customers' data.

Secrets (the webhook signing secret, the SMTP password) must not appear in the ledger, the run's
event log or any materialization metadata; customers' email addresses must not appear in metadata
previews (masked) nor in the action rows (the ledger keeps a digest of each request).
"""

import base64
import logging
import re
import secrets
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from autoexec_dagster import (
    ActionLedger,
    EmailChannel,
    Guardrails,
    Playbook,
    Rule,
    SqlChannel,
    WebhookChannel,
    build_execution_defs,
    execute_plan,
    route,
)
from autoexec_dagster.ledger import schema
from tests.conftest import churn_playbook, churn_scores
from tests.receivers import SmtpSink, WebhookReceiver

WEBHOOK_SECRET = "whsec_c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1sZWFr"
SMTP_PASSWORD = "smtp-password-that-must-never-leak"
PARTITIONS = dg.StaticPartitionsDefinition(["2026-11-24"])


def _dump(ledger: ActionLedger, table: sa.Table) -> str:
    with ledger.engine.connect() as conn:
        return "\n".join(repr(tuple(row)) for row in conn.execute(sa.select(table)))


def test_a_run_keeps_secrets_and_personal_data_out_of_ledger_logs_and_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CRM_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("TEST_SMTP_PASSWORD", SMTP_PASSWORD)
    scores = churn_scores(300)
    playbook = churn_playbook(max_flagged_fraction=0.9)

    @dg.asset(partitions_def=PARTITIONS)
    def churn_scores_asset() -> pd.DataFrame:
        return scores

    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with (
        SmtpSink(auth={"care": SMTP_PASSWORD}) as sink,
        WebhookReceiver(secret=WEBHOOK_SECRET) as receiver,
    ):
        defs = dg.Definitions.merge(
            dg.Definitions(
                assets=[churn_scores_asset],
                resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))},
            ),
            build_execution_defs(
                insight=churn_scores_asset,
                playbook=playbook,
                channels={
                    "retention_email": EmailChannel(
                        host="127.0.0.1",
                        port=sink.port,
                        username="care",
                        password=dg.EnvVar("TEST_SMTP_PASSWORD"),
                        sender="care@example.com",
                        to_column="email",
                        subject="We miss you, {{ name }}",
                        template="Hi {{ name }}",
                    ),
                    "crm_task": WebhookChannel(
                        url=receiver.url,
                        secret=dg.EnvVar("TEST_CRM_SECRET"),
                        allowed_hosts=["127.0.0.1"],
                    ),
                },
                ledger=ledger_url,
            ),
        )
        instance = dg.DagsterInstance.ephemeral()
        dg.materialize(
            [churn_scores_asset],
            partition_key="2026-11-24",
            instance=instance,
            resources={"io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))},
        )
        result = defs.resolve_job_def("churn_outreach_execution_job").execute_in_process(
            partition_key="2026-11-24", instance=instance
        )
        assert result.success
        emails = scores.loc[route_mask(scores, playbook, "retention_email"), "email"].tolist()
        assert len(sink.messages) == len(emails) > 0  # the password really was used
        assert receiver.unique_keys  # and the secret really signed requests

    ledger = ActionLedger(ledger_url)
    actions = _dump(ledger, schema.actions)
    escalations = _dump(ledger, schema.escalations)
    events = "\n".join(dg.serialize_value(entry) for entry in instance.all_logs(result.run_id))
    materializations = result.asset_materializations_for_node("churn_outreach_execution")
    assert len(materializations) == 3
    metadata = "\n".join(dg.serialize_value(m) for m in materializations)

    for secret in (WEBHOOK_SECRET, SMTP_PASSWORD, WEBHOOK_SECRET.removeprefix("whsec_")):
        for where, text in (("actions", actions), ("escalations", escalations), ("events", events)):
            assert secret not in text, f"a secret leaked into the {where}"
    # Personal data: action rows keep digests, never addresses; metadata previews are masked.
    address = re.compile(r"[\w.+-]+@example\.com")
    assert not address.findall(actions)
    assert not [a for a in address.findall(metadata) if a != "care@example.com"]
    assert "***" in metadata  # the previews are there, masked


def route_mask(scores: pd.DataFrame, playbook: Playbook, action: str) -> pd.Series:
    """Which insight rows the playbook sends ``action`` to."""
    plan = route(scores, playbook)
    return pd.Series((plan["action"].astype(str) == action).to_numpy(), index=scores.index)


# -- canary scan -----------------------------------------------------------------------------
#
# Unique random canaries for every secret (SMTP password, webhook secret, the SQL URL's password)
# and every personal value (names and addresses in personal columns), driven through
# execute_plan and through a Dagster materialization, with one recipient refused by the SMTP
# server so that an error path (which echoes the address) is taken too. Then every place a run
# writes is searched: the Python logs, every event of the Dagster run, all materialization
# metadata, and every row of every ledger table. The one exception, by design, is the escalation
# queue's ``data`` column: it keeps the entity's row for the person who works the escalation.


_DESTINATION_LOGGERS = ("mail.log", "aiohttp.access", "aiohttp.server", "aiohttp.web")


def _dump_every_table(ledger: ActionLedger) -> dict[tuple[str, str], str]:
    """(table, column) -> every value of that column, as text, for every ledger table."""
    meta = sa.MetaData()
    meta.reflect(ledger.engine)
    dumped: dict[tuple[str, str], str] = {}
    with ledger.engine.connect() as conn:
        for name, table in meta.tables.items():
            rows = conn.execute(sa.select(table)).all()
            for column in table.columns:
                dumped[(name, column.name)] = "\n".join(
                    repr(row._mapping[column.name]) for row in rows
                )
    return dumped


@pytest.mark.postgres
def test_canary_secrets_and_personal_data_appear_nowhere_but_the_escalation_data(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    postgres_url: str,
) -> None:
    smtp_password = f"smtp-canary-{secrets.token_hex(12)}"
    webhook_raw = f"webhook-canary-{secrets.token_hex(12)}".encode()
    webhook_secret = "whsec_" + base64.b64encode(webhook_raw).decode()
    sql_password = f"sqlcanary{secrets.token_hex(12)}"
    # Trust authentication ignores the password, so the canary travels in a working URL.
    sql_url = postgres_url.replace("postgres@", f"postgres:{sql_password}@", 1)
    monkeypatch.setenv("CANARY_SMTP_PASSWORD", smtp_password)
    monkeypatch.setenv("CANARY_WEBHOOK_SECRET", webhook_secret)
    monkeypatch.setenv("CANARY_SQL_URL", sql_url)
    secret_canaries = {
        "SMTP password": smtp_password,
        "webhook secret": webhook_secret,
        "webhook secret key": webhook_raw.decode(),
        "webhook secret base64": webhook_secret.removeprefix("whsec_"),
        "SQL password": sql_password,
    }

    scores = churn_scores(160)
    tokens = [secrets.token_hex(6) for _ in range(len(scores))]
    scores["name"] = [f"Canaryname{t}" for t in tokens]
    scores["email"] = [f"canary{t}@example.com" for t in tokens]
    personal = set(scores["name"]) | set(scores["email"])
    playbook = Playbook(
        name="canary_outreach",
        entity_key="customer_id",
        rules=[
            Rule(name="vip", when="churn_score >= 0.8 and lifetime_value >= 5000", escalate="Call"),
            Rule(name="at_risk", when="churn_score >= 0.7", action="retention_email"),
            Rule(name="watch", when="churn_score >= 0.5", action="crm_task"),
            Rule(name="mild", when="churn_score >= 0.3", action="crm_row"),
        ],
        guardrails=Guardrails(max_flagged_fraction=1.0),
    )
    plan = route(scores, playbook)
    refused = scores.loc[(plan["action"] == "retention_email").to_numpy(), "email"].iloc[0]

    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE crm_rows (idempotency_key VARCHAR(80) PRIMARY KEY, note TEXT, customer TEXT)"
        )
    engine.dispose()

    partitions = dg.StaticPartitionsDefinition(["2026-11-24"])

    @dg.asset(partitions_def=partitions, name="canary_scores")
    def canary_scores_asset() -> pd.DataFrame:
        return scores

    caplog.set_level(logging.DEBUG)
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    io_manager = dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))
    with (
        SmtpSink(auth={"care": smtp_password}, reject_recipients={refused}) as sink,
        WebhookReceiver(secret=webhook_secret) as receiver,
    ):
        channels = {
            "retention_email": EmailChannel(
                host="127.0.0.1",
                port=sink.port,
                username="care",
                password=dg.EnvVar("CANARY_SMTP_PASSWORD"),
                sender="care@example.com",
                to_column="email",
                subject="We miss you, {{ name }}",
                template="Hi {{ name }}, write to us from {{ email }}",
            ),
            "crm_task": WebhookChannel(
                url=receiver.url,
                secret=dg.EnvVar("CANARY_WEBHOOK_SECRET"),
                allowed_hosts=["127.0.0.1"],
            ),
            "crm_row": SqlChannel(
                url=dg.EnvVar("CANARY_SQL_URL"),
                table="crm_rows",
                columns={"note": "Call {{ name }}", "customer": "customer_id"},
            ),
        }
        # 1. execute_plan, on its own partition.
        ledger = ActionLedger(ledger_url)
        report = execute_plan(
            route(scores, playbook, partition_key="2026-11-23"),
            playbook=playbook,
            ledger=ledger,
            channels=channels,
            log=logging.getLogger("canary"),
        )
        assert report.succeeded > 0 and report.failed == 1 and report.escalated > 0
        # 2. A Dagster materialization of the execution assets.
        defs = dg.Definitions.merge(
            dg.Definitions(assets=[canary_scores_asset], resources={"io_manager": io_manager}),
            build_execution_defs(
                insight=canary_scores_asset, playbook=playbook, channels=channels, ledger=ledger_url
            ),
        )
        instance = dg.DagsterInstance.ephemeral()
        dg.materialize(
            [canary_scores_asset],
            partition_key="2026-11-24",
            instance=instance,
            resources={"io_manager": io_manager},
        )
        result = defs.resolve_job_def("canary_outreach_execution_job").execute_in_process(
            partition_key="2026-11-24", instance=instance
        )
        assert result.success
        # The canaries were really used: logins, signatures and the SQL connection all worked.
        assert len(sink.messages) > 0 and receiver.unique_keys and receiver.rejected == 0

    # The destinations' own servers (aiosmtpd, aiohttp) log what they receive at DEBUG; they
    # stand for the outside world, so only the library's records are scanned (Dagster's own
    # log lines are events of the run, scanned below).
    ours = [r for r in caplog.records if not r.name.startswith(_DESTINATION_LOGGERS)]
    assert any(r.name == "canary" for r in ours)
    logs = "\n".join(f"{caplog.handler.format(r)} {r.args!r} {r.exc_text or ''}" for r in ours)
    events = "\n".join(dg.serialize_value(entry) for entry in instance.all_logs(result.run_id))
    materializations = result.asset_materializations_for_node("canary_outreach_execution")
    assert len(materializations) == 3
    metadata = "\n".join(dg.serialize_value(m) for m in materializations)
    tables = _dump_every_table(ActionLedger(ledger_url))
    assert ("autoexec_escalations", "data") in tables

    places = {"python logs": logs, "Dagster events": events, "metadata": metadata}
    places.update({f"ledger {t}.{c}": text for (t, c), text in tables.items()})
    for where, text in places.items():
        for what, canary in secret_canaries.items():
            assert canary not in text, f"the {what} leaked into the {where}"
        if where == "ledger autoexec_escalations.data":
            continue  # by design: the entity data a person needs to act on the escalation
        leaked = sorted(value for value in personal if value in text)
        assert not leaked, f"personal data leaked into the {where}: {leaked[:3]}"
    # The exception is real, not vacuous: escalated customers' data is there for the person.
    assert any(value in tables[("autoexec_escalations", "data")] for value in personal)
