"""A worker process for the delivery tests: routes a deterministic insight and executes it.

Run as ``python -m tests.delivery_worker --ledger URL --webhook URL --entities N [--name A]``;
prints the report as one JSON line. Tests start it as a real process so they can kill it with SIGKILL or run
two at once.
"""

import argparse
import json
import sys

import pandas as pd

from autoexec_dagster import (
    ActionLedger,
    Guardrails,
    Playbook,
    Rule,
    WebhookChannel,
    execute_plan,
    route,
)

SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLWRlbGl2ZXJ5LXRlc3Rz"
PARTITION = "2026-11-24"


def playbook() -> Playbook:
    """Every entity gets a CRM task; the guardrails are opened for the volume."""
    return Playbook(
        name="crm_sync",
        entity_key="account_id",
        rules=[Rule(name="every_account", when="score >= 0", action="crm_task")],
        guardrails=Guardrails(max_actions=None, max_flagged_fraction=1.0),
    )


def insight(n: int) -> pd.DataFrame:
    """``n`` accounts with a score, the same on every call."""
    return pd.DataFrame(
        {"account_id": [f"A{i:06d}" for i in range(n)], "score": [i % 100 / 100 for i in range(n)]}
    )


def plan_keys(n: int) -> list[str]:
    """The idempotency keys the worker will deliver."""
    return route(insight(n), playbook(), partition_key=PARTITION)["idempotency_key"].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--webhook", required=True)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--name", default="", help="sent as the X-Worker header, so a receiver can tell who sent"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    args = parser.parse_args(argv)
    channel = WebhookChannel(
        url=args.webhook,
        secret=SECRET,
        allowed_hosts=["127.0.0.1"],
        max_concurrency=args.concurrency,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.5,
        timeout_seconds=args.timeout,
        headers={"X-Worker": args.name} if args.name else {},
    )
    report = execute_plan(
        route(insight(args.entities), playbook(), partition_key=PARTITION),
        playbook=playbook(),
        ledger=ActionLedger(args.ledger),
        channels={"crm_task": channel},
        partition_key=PARTITION,
    )
    print(json.dumps(report.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
