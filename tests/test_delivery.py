"""The delivery engine's own machinery (its promises end to end are in test_delivery_guarantees)."""

import asyncio
import logging
from pathlib import Path

import pytest

from autoexec_dagster.executor.delivery import DeliveryEngine
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.ledger.action_ledger import ActionLedger


def _engine(ledger: ActionLedger) -> DeliveryEngine:
    return DeliveryEngine(
        ledger=ledger,
        channels={},
        report=ExecutionReport(
            playbook="p", playbook_version="v", insight="i", partition_key="k", dry_run=False
        ),
        playbook="p",
        partition_key="k",
        run_id=None,
        lease_seconds=60.0,
        progress_interval=60.0,
        on_progress=None,
        log=logging.getLogger("test"),
    )


@pytest.mark.parametrize("turns", range(6))
def test_the_flusher_ends_when_cancelled_as_a_flush_is_wanted(tmp_path: Path, turns: int) -> None:
    # A failing background task cancels the flusher while senders may be asking it to flush.
    # asyncio.wait_for on Python 3.11 swallows a cancellation that lands after the awaited
    # event is set but before the waiting task resumes; the flusher then looped on and the run
    # hung (a heartbeat fault test timed out in CI). One of these turn counts lands in that gap.
    ledger = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")

    async def scenario() -> bool:
        engine = _engine(ledger)
        flusher = asyncio.create_task(engine._flusher())
        await asyncio.sleep(0)  # the flusher now waits for a flush to be wanted
        engine.flush_wanted.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        flusher.cancel()
        done, _ = await asyncio.wait({flusher}, timeout=2.0)
        if not done:
            engine.stopping = True  # let it end so the loop can close
            await flusher
        return bool(done) and flusher.cancelled()

    try:
        assert asyncio.run(scenario()), "the flusher went on after it was cancelled"
    finally:
        ledger.dispose()
