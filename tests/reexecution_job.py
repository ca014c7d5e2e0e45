"""A reconstructable execution job for the re-execution test (Dagster re-executes by import).

``build_job`` builds a project from ``$AUTOEXEC_TEST_REEXEC_DIR``: a statically partitioned
insight held in memory by a :class:`~tests.counting.CountingIOManager`, the churn playbook, a
recording destination and a SQLite ledger in that folder. What the runs did is kept per folder in
:data:`STATE`, because Dagster rebuilds the job for every execution in this same process.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from autoexec_dagster.dagster.defs_factory import build_execution_defs
from tests.conftest import churn_playbook, churn_scores
from tests.counting import Counts, counting_io_manager
from tests.test_execution_assets import INSIGHT, JOB, Recorder, recording_channels

DIR_ENV = "AUTOEXEC_TEST_REEXEC_DIR"
PARTITION = "p1"


@dataclass
class State:
    """One folder's insight values, counters and destination."""

    counts: Counts = field(default_factory=Counts)
    store: dict[str, Any] = field(default_factory=dict)
    recorder: Recorder = field(default_factory=Recorder)


STATE: dict[str, State] = {}


def state(folder: Path) -> State:
    """The state of the project in ``folder``."""
    return STATE.setdefault(str(folder), State())


def build_defs() -> dg.Definitions:
    """The project in ``$AUTOEXEC_TEST_REEXEC_DIR``."""
    folder = Path(os.environ[DIR_ENV])
    current = state(folder)

    @dg.asset(
        name=INSIGHT,
        partitions_def=dg.StaticPartitionsDefinition([PARTITION]),
        io_manager_key="insight_io",
    )
    def insight() -> Any:
        return churn_scores(300, seed=11)

    return dg.Definitions.merge(
        dg.Definitions(
            assets=[insight],
            resources={"insight_io": counting_io_manager(current.counts, current.store)},
        ),
        build_execution_defs(
            insight=insight,
            playbook=churn_playbook(max_flagged_fraction=0.9),
            channels=recording_channels(current.recorder),
            ledger=f"sqlite:///{folder / 'ledger.db'}",
        ),
    )


def build_job() -> dg.JobDefinition:
    """The execution job of the project (what ``dg.reconstructable`` imports)."""
    return build_defs().resolve_job_def(JOB)


def materialize_insight(instance: dg.DagsterInstance) -> None:
    """Materialize the insight partition (through the counting IO manager) on ``instance``."""
    defs = build_defs()
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        partition_key=PARTITION,
        instance=instance,
        asset_selection=[dg.AssetKey(INSIGHT)],
    )
    assert result.success
