"""Plans routed by the insight checks, handed to the execution graph of the same run.

The blocking checks and the execution graph of one run both need the routed plan of the same
partition. The checks run first, in the same process under the in-process executor the execution
job uses, so they leave the plan here keyed by (run id, playbook, partition) and the graph's
``route`` op takes it instead of loading and routing the insight a second time. A miss (another
executor, a run without the checks, a re-execution in a new process) only costs that second load:
the ``route`` op then loads the insight itself.
"""

import threading
from collections import OrderedDict

import pandas as pd

# A run holds one partition; a few slots cover runs that overlap in one process.
_MAX_PLANS = 4


class RoutedPlans:
    """A small, thread-safe hand-over of routed plans between steps of one run."""

    def __init__(self, max_plans: int = _MAX_PLANS) -> None:
        self._plans: OrderedDict[tuple[str, str, str], pd.DataFrame] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_plans

    def put(self, *, run_id: str, playbook: str, partition_key: str, plan: pd.DataFrame) -> None:
        """Leave the plan for the run's ``route`` op, dropping the oldest beyond the bound."""
        with self._lock:
            self._plans[(run_id, playbook, partition_key)] = plan
            while len(self._plans) > self._max:
                self._plans.popitem(last=False)

    def take(self, *, run_id: str, playbook: str, partition_key: str) -> pd.DataFrame | None:
        """The plan the run's checks routed, removed from the hand-over; None when absent."""
        with self._lock:
            return self._plans.pop((run_id, playbook, partition_key), None)


ROUTED_PLANS = RoutedPlans()
