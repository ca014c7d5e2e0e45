"""What every story of the demo does with Dagster: progress lines, sensor ticks and the runs they ask for.

The demo evaluates each sensor the way the daemon would, with its cursor kept in the instance
folder, and executes each run the sensor requests in process, tagged as the daemon tags it. So
the UI (``make ui``) afterwards shows the runs as the sensors' and a daemon started later does not
request the same run keys again.
"""

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dagster as dg

_started = time.monotonic()


def say(message: str) -> None:
    """Print a progress line with the seconds since the demo started."""
    print(f"[{time.monotonic() - _started:5.1f}s] {message}", flush=True)


def run_config(verbose: bool) -> dict[str, Any]:
    """Run config that keeps Dagster's console logger quiet unless ``verbose``."""
    # Dagster's console logger prints every event at DEBUG; the demo prints its own progress.
    level = "INFO" if verbose else "WARNING"
    return {"loggers": {"console": {"config": {"log_level": level}}}}


def load_cursor(path: Path) -> str | None:
    """The sensor cursor stored by an earlier demo run, or None before the first."""
    return (path.read_text().strip() or None) if path.exists() else None


def store_cursor(path: Path, cursor: str | None) -> None:
    """Store the sensor cursor; written aside and renamed so a crash never leaves half of it."""
    if cursor is None:
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_text(cursor)
    os.replace(partial, path)


def cursor_path(home: Path, sensor_name: str) -> Path:
    """Where the demo keeps a sensor's cursor: the storage ids in it belong to this instance."""
    return home / f"autoexec_demo_{sensor_name}_cursor.json"


@dataclass(frozen=True)
class Tick:
    """One sensor evaluation.

    Attributes:
        requests: The runs it requested.
        cursor: Its new cursor.
        skip_reason: Why it requested nothing, when it says.
    """

    requests: list["dg.RunRequest"]
    cursor: str | None
    skip_reason: str | None


def tick(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    sensor_name: str,
    *,
    cursor: str | None,
    verbose: bool = False,
) -> Tick:
    """Evaluate a sensor once, as the daemon would.

    Args:
        defs: The definitions holding the sensor.
        instance: The Dagster instance.
        sensor_name: The sensor.
        cursor: Its cursor from the previous tick.
        verbose: Let its log lines through (the daemon would file them with the tick).

    Raises:
        SystemExit: The sensor returned something other than a SensorResult.
    """
    import dagster as dg

    sensor = defs.resolve_sensor_def(sensor_name)
    context = dg.build_sensor_context(
        instance=instance, definitions=defs, cursor=cursor, sensor_name=sensor_name
    )
    if not verbose:
        # The sensor's context.log prints to the console at INFO; the demo prints its own line.
        context.log.setLevel(logging.WARNING)
    result = sensor(context)
    if not isinstance(result, dg.SensorResult):
        raise SystemExit(f"{sensor_name} returned {type(result).__name__}, not a SensorResult")
    requests = [r for r in (result.run_requests or []) if isinstance(r, dg.RunRequest)]
    skipped = result.skip_reason
    reason = skipped.skip_message if isinstance(skipped, dg.SkipReason) else skipped
    return Tick(requests=requests, cursor=result.cursor, skip_reason=reason)


def execute_request(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    sensor_name: str,
    request: "dg.RunRequest",
    *,
    config: Mapping[str, Any],
) -> "dg.ExecuteInProcessResult":
    """Execute one run a sensor requested, in process, tagged as a daemon-launched run.

    Raises:
        SystemExit: The sensor targets no job, or the run failed.
    """
    job_name = request.job_name or defs.resolve_sensor_def(sensor_name).job_name
    if job_name is None:
        raise SystemExit(f"{sensor_name} targets no job")
    run = defs.resolve_job_def(job_name).execute_in_process(
        partition_key=request.partition_key,
        instance=instance,
        run_config=dict(config),
        # The tags a daemon-launched run carries: the UI shows the run as the sensor's, and a
        # daemon started later on this instance does not request the same run key again.
        tags={
            **request.tags,
            "dagster/sensor_name": sensor_name,
            "dagster/run_key": request.run_key or "",
        },
        raise_on_error=False,
    )
    if not run.success:
        failed = ", ".join(run.get_failed_step_keys()) or "see the run"
        raise SystemExit(
            f"{job_name} for {request.partition_key} failed in {failed} (run {run.run_id})"
        )
    return run


def train_once(
    instance: "dg.DagsterInstance",
    *,
    assets: "list[Any]",
    selection: "list[Any]",
    model: Any,
    announce: str,
    run_config: Mapping[str, Any],
) -> Mapping[str, Any] | None:
    """Materialize a story's training assets unless its model was trained before.

    Args:
        instance: The demo's Dagster instance.
        assets: The story's assets.
        selection: The assets to materialize (the history and the model).
        model: The model asset; an existing materialization of it means "trained".
        announce: The progress line printed before training.
        run_config: Run config of the training run.

    Returns:
        The model's materialization metadata values, or None when it was trained before.

    Raises:
        SystemExit: The training run failed.
    """
    import dagster as dg

    name = model.key.to_user_string()
    event = instance.get_latest_materialization_event(model.key)
    if event is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(event.timestamp))
        say(f"training: {name} already trained ({when}), reusing it")
        return None
    say(announce)
    result = dg.materialize(
        assets, selection=selection, instance=instance, run_config=run_config, raise_on_error=False
    )
    if not result.success:
        raise SystemExit(f"training failed: see run {result.run_id} in the Dagster UI")
    metadata = result.asset_materializations_for_node(name)[0].metadata
    return {key: value.value for key, value in metadata.items()}


def project_ledger_url() -> str:
    """The ledger the CLI finds by itself when run from the project folder."""
    from demo import PROJECT_DIR

    return f"sqlite:///{PROJECT_DIR / 'var' / 'autoexec_ledger.db'}"


def count_line(label: str, value: Any, note: str = "", *, width: int = 28) -> str:
    """One line of a summary: a label, a right-aligned number and an optional note."""
    text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"  {label:<{width}}{text:>8}" + (f"  {note}" if note else "")


def check_line(left: str, a: int, right: str, b: int) -> bool:
    """Print one comparison of the demo's record checks; True when both sides agree."""
    mark = "==" if a == b else "!="
    print(f"check: {left} ({a:,}) {mark} {right} ({b:,})" + ("" if a == b else "  MISMATCH"))
    return a == b
