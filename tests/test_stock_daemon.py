"""The real ``dagster-daemon`` runs the stock story: a decision wakes the workflow, the order goes on.

The reference deployment (``workspace.yaml`` -> ``definitions.py``) runs under the daemon with its
sensors switched on (``AUTOEXEC_SENSOR_STATUS=running``, 2 s interval) and every destination
given through the environment a real deployment reads: the supplier API and the SMTP sink of this
test (in its process, on 127.0.0.1), the catalogue in the var folder, the approval links' URL and
secret. One ``stock_shortages`` day lands before the daemon starts; the insight sensor's run
drafts the orders, sends the small ones and parks the large ones for procurement. While the daemon
runs, procurement approves one order with ``autoexec approve`` and rejects one through the
ledger: the workflows sensor finds the decided instances due and its run submits the approved
order, whose arrival the test waits for at the supplier API, and ends the rejected one.

Time is real here (the daemon's processes read no injected clock): the suppliers confirm at once
(``confirm_delay_seconds=0``), so a submitted order is confirmed by its first follow-up, in the
same run.
"""

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from assets import demand_forecast_model, sales_history, stock_assets, stock_shortages
from autoexec_dagster import ActionLedger
from resources.local_servers import SmtpSink
from resources.supplier_api import SupplierApi
from resources.suppliers import SupplierCatalogue
from tests.e2e_support import (
    BIN_DIR,
    QUIET,
    REPO,
    SECRET,
    Deployment,
    instance_at,
    start_process,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.slow

DAY = "2026-11-10"
PLAYBOOK = "stock_replenishment"
JOB = f"{PLAYBOOK}_execution_job"
APPROVAL_SECRET = "stock-daemon-approval-secret-0123456789"
RUNS_TIMEOUT = 240.0


def _runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(job_name=JOB), ascending=True))


def _order(api: SupplierApi, sku: str) -> dict[str, Any]:
    (order,) = [o for o in api.purchase_orders() if o["sku"] == sku]
    return order


def test_under_the_daemon_a_decision_wakes_the_workflow_and_the_order_goes_on(
    tmp_path: Path,
) -> None:
    deployment = Deployment.create(tmp_path)
    log = tmp_path / "daemon.log"
    catalogue = SupplierCatalogue(deployment.var / "suppliers.sqlite").create(
        as_of=dt.date.fromisoformat(DAY)
    )
    with (
        SupplierApi(
            SECRET,
            deployment.var / "supplier_api.sqlite",
            catalogue=catalogue,
            confirm_delay_seconds=0,
        ) as api,
        SmtpSink(deployment.mailbox) as sink,
        instance_at(deployment.home) as instance,
    ):
        trained = dg.materialize(
            stock_assets,
            selection=[sales_history, demand_forecast_model],
            instance=instance,
            run_config=QUIET,
        )
        landed = dg.materialize(
            stock_assets,
            selection=[stock_shortages],
            partition_key=DAY,
            instance=instance,
            run_config=QUIET,
        )
        assert trained.success and landed.success

        env = deployment.env(
            smtp_port=sink.port,
            crm_url="http://127.0.0.1:9/tasks",
            AUTOEXEC_SENSOR_STATUS="running",
            AUTOEXEC_SENSOR_INTERVAL_SECONDS="2",
            SUPPLIER_API_SECRET=SECRET,
            AUTOEXEC_SUPPLIER_API_URL=api.url,
            AUTOEXEC_APPROVAL_URL="http://127.0.0.1:8765",
            AUTOEXEC_APPROVAL_SECRET=APPROVAL_SECRET,
        )
        ledger = ActionLedger(deployment.ledger_url)
        daemon = start_process(
            [str(BIN_DIR / "dagster-daemon"), "run", "-w", "workspace.yaml"], env=env, log=log
        )
        try:
            # The insight sensor's run: orders drafted, the large ones waiting for procurement.
            first = wait_for(
                lambda: [r for r in _runs(instance) if r.is_finished] or None,
                timeout=RUNS_TIMEOUT,
                what=f"the first finished {JOB} run",
                alive=daemon,
                log=log,
            )[0]
            assert first.status == dg.DagsterRunStatus.SUCCESS, first.run_id
            assert first.tags.get("dagster/sensor_name") == f"{PLAYBOOK}_sensor"
            pending = ledger.pending_approvals(playbook=PLAYBOOK).sort_values("value")
            assert len(pending) >= 2
            approve, reject = pending.to_dict("records")[:2]
            assert sink.wait_for_messages(len(pending), timeout=30)
            for request in (approve, reject):
                order = _order(api, str(request["entity_id"]))
                assert order["status"] == "draft" and order["submitted_at"] is None

            decided = subprocess.run(
                [
                    str(BIN_DIR / "autoexec"),
                    "approve",
                    str(approve["approval_id"])[:12],
                    "--by",
                    "procurement",
                    "--note",
                    "approved while the daemon runs",
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert decided.returncode == 0, decided.stdout + decided.stderr
            ledger.reject(
                [str(reject["approval_id"])], by="procurement", note="not this week", via="python"
            )

            # The workflows sensor wakes the decided instances; its run submits the order.
            sku = str(approve["entity_id"])
            submitted = wait_for(
                lambda: _order(api, sku) if _order(api, sku)["submitted_at"] else None,
                timeout=RUNS_TIMEOUT,
                what=f"the approved order of {sku} submitted to the supplier API",
                alive=daemon,
                log=log,
            )
            assert submitted["status"] in ("submitted", "confirmed")

            def both_finished() -> dict[str, str] | None:
                states = ledger.instances(playbook=PLAYBOOK).set_index("entity_id")["state"]
                found = {s: str(states[s]) for s in (sku, str(reject["entity_id"]))}
                busy = [r for r in _runs(instance) if not r.is_finished]
                done = "running" not in found.values() and "waiting" not in found.values()
                return found if done and not busy else None

            states = wait_for(
                both_finished,
                timeout=RUNS_TIMEOUT,
                what="the approved and the rejected instance finished",
                alive=daemon,
                log=log,
            )
        finally:
            stop_process(daemon)
            ledger.dispose()

        assert states == {sku: "succeeded", str(reject["entity_id"]): "rejected"}
        runs = _runs(instance)
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [
            (r.run_id, r.status) for r in runs
        ]
        woken = [
            r for r in runs if r.tags.get("dagster/sensor_name") == f"{PLAYBOOK}_workflows_sensor"
        ]
        assert woken, [r.tags for r in runs]
        # The approved order was submitted once, confirmed and put on order once.
        order = _order(api, sku)
        assert order["status"] == "confirmed"
        submits = [
            c
            for c in api.calls()
            if c["endpoint"] == "submit"
            and c["po_id"] == order["po_id"]
            and c["outcome"] == "submitted"
        ]
        assert len(submits) == 1
        applied = catalogue.applied_orders()
        mine = applied[applied["po_id"] == order["po_id"]]["quantity"].tolist()
        assert mine == [order["quantity"]]
        # The rejected one never reached the supplier.
        assert _order(api, str(reject["entity_id"]))["submitted_at"] is None
