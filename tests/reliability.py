"""Shared by the fault suites: how many trials to run, and where their figures go.

``make test`` runs each fault suite in its fast form. ``make reliability`` sets
``AUTOEXEC_RELIABILITY=full``, which raises every suite to its full trial count, and
``reliability/report.py`` turns the recorded figures into ``reliability/RESULTS.md``.

Each suite records one JSON line per trial (or per case corpus) with :func:`record`, so the
report states exactly what ran: trials, faults injected, cases, lost and duplicated actions.
"""

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

FULL = os.environ.get("AUTOEXEC_RELIABILITY", "").lower() == "full"
FIGURES_FILE = Path(
    os.environ.get(
        "AUTOEXEC_RELIABILITY_FIGURES",
        str(Path(__file__).resolve().parent.parent / "test-artifacts" / "reliability.jsonl"),
    )
)
_lock = threading.Lock()


def trials(fast: int, full: int) -> int:
    """The number of trials (or entities, or cases) for this run: ``full`` under make reliability."""
    return full if FULL else fast


def record(suite: str, **figures: Any) -> None:
    """Append one line of figures for ``suite`` (e.g. ``lost=0, duplicates=3, window=100``)."""
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    # run_mode last: a suite's own figures may use "mode" (a fault mode) without hiding it.
    line = json.dumps(
        {"suite": suite, "at": time.time(), **figures, "run_mode": "full" if FULL else "fast"},
        default=str,
        sort_keys=True,
    )
    with _lock, FIGURES_FILE.open("a", encoding="utf-8") as out:
        out.write(line + "\n")
