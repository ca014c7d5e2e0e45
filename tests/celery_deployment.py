"""The sharded execution job of the celery tests, as a code location the workers rebuild.

A celery worker rebuilds the job it executes a step of from this module (``dg.reconstructable``),
so everything a run depends on comes from the environment, set alike for the test process and
every worker (:func:`environment`):

- ``AUTOEXEC_CELERY_LEDGER``: the ledger URL (PostgreSQL: every worker claims from it);
- ``AUTOEXEC_CELERY_HOOK``: the webhook receiver's URL;
- ``AUTOEXEC_CELERY_IO``: the insight's IO manager directory (shared by every worker);
- ``AUTOEXEC_CELERY_ENTITIES``, ``_SHARDS``, ``_CONCURRENCY``, ``_RATE``, ``_LEASE``: the
  partition's size, the shards, the channel's limits (for the whole partition) and the lease.

The executor is dagster-celery's on the local RabbitMQ, with the settings README's production
set-up asks for (:data:`CELERY_SETTINGS`): a step is acknowledged only once it finished, so a
worker killed midway leaves its step to be delivered to another worker.
"""

import os
from collections.abc import Mapping

import dagster as dg
import pandas as pd
from dagster_celery import celery_executor

from autoexec_dagster import WebhookChannel, build_execution_defs, route
from tests.delivery_worker import PARTITION, SECRET, insight, playbook

BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
# Late acknowledgement: a step's message stays with RabbitMQ until the step finished, so the
# step of a worker that died is delivered to another; one message at a time per worker, so a
# busy worker holds no step another could run.
CELERY_SETTINGS: dict[str, object] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
}
JOB = f"{playbook().name}_execution_job"
INSIGHT = "accounts_to_sync"


def environment(
    *,
    ledger: str,
    hook: str,
    io_dir: str,
    entities: int,
    shards: int,
    concurrency: int,
    rate: float,
    lease_seconds: float,
) -> dict[str, str]:
    """The variables that configure :func:`execution_job` (for the test and its workers)."""
    return {
        "AUTOEXEC_CELERY_LEDGER": ledger,
        "AUTOEXEC_CELERY_HOOK": hook,
        "AUTOEXEC_CELERY_IO": io_dir,
        "AUTOEXEC_CELERY_ENTITIES": str(entities),
        "AUTOEXEC_CELERY_SHARDS": str(shards),
        "AUTOEXEC_CELERY_CONCURRENCY": str(concurrency),
        "AUTOEXEC_CELERY_RATE": str(rate),
        "AUTOEXEC_CELERY_LEASE": str(lease_seconds),
    }


def worker_config_module() -> str:
    """The ``dagster_celery_config`` module the workers load: the same broker and settings."""
    lines = [f"broker_url = {BROKER!r}"]
    lines += [f"{name} = {value!r}" for name, value in CELERY_SETTINGS.items()]
    return "\n".join(lines) + "\n"


def _env(name: str, env: Mapping[str, str] | None = None) -> str:
    source = os.environ if env is None else env
    try:
        return source[f"AUTOEXEC_CELERY_{name}"]
    except KeyError:
        raise RuntimeError(
            f"AUTOEXEC_CELERY_{name} is not set: tests/celery_deployment.py is configured by "
            "the environment of the celery test"
        ) from None


def plan_keys(entities: int) -> list[str]:
    """The idempotency keys the job delivers for a partition of ``entities`` accounts."""
    plan = route(insight(entities), playbook(), partition_key=PARTITION, insight_name=INSIGHT)
    return plan["idempotency_key"].tolist()


def insight_asset() -> dg.AssetsDefinition:
    """The insight: every account of the partition, each to be synced to the CRM."""
    entities = int(_env("ENTITIES"))

    @dg.asset(name=INSIGHT, partitions_def=dg.StaticPartitionsDefinition([PARTITION]))
    def accounts_to_sync() -> pd.DataFrame:
        return insight(entities)

    return accounts_to_sync


def definitions() -> dg.Definitions:
    """The insight and its sharded execution layer under the celery executor."""
    asset = insight_asset()
    channel = WebhookChannel(
        url=_env("HOOK"),
        secret=SECRET,
        allowed_hosts=["127.0.0.1"],
        max_concurrency=int(_env("CONCURRENCY")),
        rate_limit_per_second=float(_env("RATE")),
        timeout_seconds=10.0,
        backoff_base_seconds=0.05,
        backoff_max_seconds=0.5,
    )
    execution = build_execution_defs(
        insight=asset,
        playbook=playbook(),
        channels={"crm_task": channel},
        ledger=_env("LEDGER"),
        shards=int(_env("SHARDS")),
        lease_seconds=float(_env("LEASE")),
        executor_def=celery_executor.configured(
            {"broker": BROKER, "config_source": dict(CELERY_SETTINGS)}
        ),
    )
    return dg.Definitions.merge(
        dg.Definitions(
            assets=[asset],
            resources={"io_manager": dg.FilesystemIOManager(base_dir=_env("IO"))},
        ),
        execution,
    )


def execution_job() -> dg.JobDefinition:
    """The partition's execution job (``dg.reconstructable`` target)."""
    return definitions().resolve_job_def(JOB)
