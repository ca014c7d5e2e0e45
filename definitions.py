"""The reference deployment's Dagster definitions: the churn pipeline plus its execution layer.

Loaded by ``dagster-webserver -w workspace.yaml`` and ``dagster-daemon run -w workspace.yaml``.
The execution layer is configured from the environment (see :mod:`resources.channels` and
:mod:`sensors.churn_execution`); building the definitions opens no database and no connection.
"""

import dagster as dg

from assets import churn_assets
from sensors import build_churn_execution_defs, churn_scoring_job, churn_scoring_schedule


def build_defs(execution_defs: dg.Definitions | None = None) -> dg.Definitions:
    """The churn assets, the daily scoring job and schedule, merged with an execution layer.

    Args:
        execution_defs: The execution layer; None builds it from the environment.

    Returns:
        The deployment's definitions.
    """
    pipeline = dg.Definitions(
        assets=churn_assets,
        jobs=[churn_scoring_job],
        schedules=[churn_scoring_schedule],
    )
    return dg.Definitions.merge(
        pipeline, execution_defs if execution_defs is not None else build_churn_execution_defs()
    )


defs = build_defs()
