"""Nothing secret or personal leaks: a real Dagster run over real SMTP (with login) and signed
webhooks, then every place the run wrote is searched for the secrets and the customers' data.

Secrets (the webhook signing secret, the SMTP password) must not appear in the ledger, the run's
event log or any materialization metadata; customers' email addresses must not appear in metadata
previews (masked) nor in the action rows (the ledger keeps a digest of each request).
"""

import re
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from autoexec_dagster import (
    ActionLedger,
    EmailChannel,
    Playbook,
    WebhookChannel,
    build_execution_defs,
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
