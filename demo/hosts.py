"""The host-remediation story of the demo (``python -m demo hosts``), end to end.

1. Start the infrastructure API (``python -m resources.infra_api``) as its own process on a free
   port of 127.0.0.1, keeping its record in ``var/infra.sqlite``. It fails 5% of calls with a
   503 (the channels retry them) and a restarted service answers again 45 s after the restart.
2. Use the Dagster instance at ``$DAGSTER_HOME``: train the anomaly model once, then score one
   hour (``--hour``) of the fleet's metrics with the execution layer's blocking checks.
3. Evaluate ``host_remediation_sensor`` as the daemon would and run the execution job it
   requests: anomalous hosts start the ``remediate`` workflow (isolate, diagnose, restart or
   clean the disk, verify until healthy, reinstate), database hosts go to a person at once.
4. Let the workflows advance to the end: whenever work is due, the runs the workflows sensor
   requests (or, where the library has no such sensor, the execution job for each partition
   with due work) take every instance as far as it can go, then end.
5. Print what happened and check the API's own record against the ledger.

Time. The story runs on an injected clock: a file (``var/host_demo_clock.txt``) that the ledger
(through :class:`resources.infra_api.FileClock`) and the API process both read. Nothing waits in
real time for a poll interval: when the next workflow work is due, the demo moves the clock to
that moment and lets the sensor find it. So the playbook runs with its production settings
(health every 30 s for up to 10 minutes, the API's 45 s restart delay) and the whole story takes
seconds. The clock starts at the real time (or where an earlier run left it, if later) and only
moves forward.
"""

import contextlib
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demo import PROJECT_DIR, ensure_infra_secret, prepare_dagster_home
from demo.runs import (
    check_line,
    count_line,
    cursor_path,
    execute_request,
    load_cursor,
    project_ledger_url,
    say,
    store_cursor,
    tick,
    train_once,
)
from demo.runs import run_config as make_run_config

if TYPE_CHECKING:
    import dagster as dg

    from autoexec_dagster import ActionLedger

DEFAULT_HOUR = "2026-12-01-10:00"
PLAYBOOK = "host_remediation"
SENSOR_NAME = f"{PLAYBOOK}_sensor"
# build_execution_defs adds this sensor for a playbook with workflows (issue 7).
WORKFLOWS_SENSOR_NAME = f"{PLAYBOOK}_workflows_sensor"
SCORING_JOB = "host_scoring_job"
EXECUTION_NODE = f"{PLAYBOOK}_execution"
CLOCK_FILE_NAME = "host_demo_clock.txt"
API_LOG_NAME = "infra_api.log"
API_STARTUP_TIMEOUT_SECONDS = 60.0
API_STOP_TIMEOUT_SECONDS = 10.0
# Real seconds the advance loop may take, and runs it may execute, before the demo gives up: the
# playbook's 10-minute poll timeout ends every workflow after about 22 advance runs.
ADVANCE_DEADLINE_SECONDS = 300.0
MAX_ADVANCE_RUNS = 200
LISTED_ESCALATIONS = 8
WIDTH = 34


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: Any) -> dt.datetime:
    import pandas as pd

    stamp = pd.Timestamp(value)
    return (stamp.tz_localize(dt.UTC) if stamp.tzinfo is None else stamp).to_pydatetime()


def _clock_text(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


class DemoClock:
    """The host story's time, kept in a file the ledger and the API process both read.

    Args:
        path: The file; it holds one ISO 8601 UTC time.
    """

    def __init__(self, path: Path) -> None:
        from resources.infra_api import FileClock

        self.path = path
        self.read = FileClock(path)

    def start(self) -> dt.datetime:
        """Set the clock to the real time, or leave it where an earlier run left it if later."""
        return self.move_to(max(self.read(), _utc_now()))

    def move_to(self, when: dt.datetime) -> dt.datetime:
        """Move the clock forward to ``when`` (never back); returns the time it now shows."""
        now = max(when, self.read()) if self.path.exists() else when
        # Written aside and renamed: the API reads the file on every request and must never see
        # half a timestamp.
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(now.astimezone(dt.UTC).isoformat())
        os.replace(partial, self.path)
        return now


class InfraApiProcess:
    """The infrastructure API as its own process (its ``main()``), started before the demo's
    heavy imports so both load at once.

    It reads its secret from ``$INFRA_API_SECRET`` (inherited, never an argument: arguments are
    visible to every user of the machine), binds a free port of 127.0.0.1 and stops by itself if
    this process dies.

    Args:
        db: Its SQLite record.
        clock_file: The injected clock it reads.
        log_file: Where its log goes (appended).
    """

    def __init__(self, *, db: Path, clock_file: Path, log_file: Path) -> None:
        self.db = db
        self.log_file = log_file
        command = [
            sys.executable,
            "-m",
            "resources.infra_api",
            "--port=0",
            f"--db={db}",
            f"--clock-file={clock_file}",
            f"--owner-pid={os.getpid()}",
        ]
        with log_file.open("a") as log:
            self.proc = subprocess.Popen(
                command, cwd=PROJECT_DIR, text=True, stdout=subprocess.PIPE, stderr=log
            )

    def wait_ready(self) -> dict[str, Any]:
        """Its ready line: ``port``, ``url``, ``urls`` (action -> endpoint URL), ``db``, ``pid``.

        Raises:
            SystemExit: It exited or printed nothing before the deadline.
        """
        from demo.ui import read_ready_line

        try:
            return read_ready_line(
                self.proc, API_STARTUP_TIMEOUT_SECONDS, name="the infrastructure API"
            )
        except RuntimeError as exc:
            raise SystemExit(f"{exc} (its log: {self.log_file})") from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=API_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class ApiRecord:
    """The infrastructure API's own record, read from its SQLite database.

    Attributes:
        executed: Idempotency key -> how many calls with it were executed (the action done).
        outcomes: Calls per outcome (executed, failed_transient, replayed, ...).
        calls: Calls received.
        hosts: host_id -> its row of ``hosts`` (state, fault, ...).
        last_health: host_id -> the status of its latest executed health check.
        hosts_called: Hosts named by at least one call.
    """

    executed: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_health: dict[str, str] = field(default_factory=dict)
    hosts_called: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, db: Path) -> "ApiRecord":
        """Read the record through a read-only connection of the demo's own (the API keeps WAL)."""
        record = cls()
        if not db.exists():
            return record
        uri = f"file:{db}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as conn:
            conn.row_factory = sqlite3.Row
            for row in conn.execute("SELECT idempotency_key, host_id, outcome FROM calls"):
                record.calls += 1
                record.outcomes[row["outcome"]] += 1
                if row["host_id"]:
                    record.hosts_called.add(str(row["host_id"]))
                if str(row["outcome"]).startswith("executed"):
                    record.executed[str(row["idempotency_key"])] += 1
            for row in conn.execute("SELECT * FROM hosts"):
                record.hosts[str(row["host_id"])] = dict(row)
            for row in conn.execute(
                "SELECT host_id, reply FROM replies WHERE endpoint = 'health' ORDER BY at"
            ):
                record.last_health[str(row["host_id"])] = str(json.loads(row["reply"])["status"])
        return record


@dataclass
class HostOutcome:
    """One hour's remediation as the ledger records it, whichever runs did the work.

    Attributes:
        hour: The host_anomalies partition.
        flagged: Hosts the playbook flagged.
        remediated: Hosts whose workflow finished: grouped by what was found and done.
        remediated_hosts: Their ids.
        failed: Hosts whose workflow failed, with the evidence, in escalation order.
        databases: Database hosts escalated by the rule, with their anomaly score.
        active: Instances not finished.
        resolution_seconds: Demo-clock seconds from isolation to reinstatement per host.
        escalated: Escalations of the partition (the ledger's count, as the metadata shows).
    """

    hour: str
    flagged: int = 0
    remediated: Counter[str] = field(default_factory=Counter)
    remediated_hosts: set[str] = field(default_factory=set)
    failed: list[dict[str, Any]] = field(default_factory=list)
    databases: dict[str, float] = field(default_factory=dict)
    active: int = 0
    resolution_seconds: list[float] = field(default_factory=list)
    escalated: int = 0

    @classmethod
    def from_ledger(cls, ledger: "ActionLedger", hour: str) -> "HostOutcome":
        """Read the hour's outcome: the ledger's counts, instances and escalation queue."""
        totals = ledger.partition_outcome(playbook=PLAYBOOK, partition_key=hour)
        outcome = cls(hour, flagged=totals.flagged, escalated=totals.escalated)
        instances = ledger.instances(playbook=PLAYBOOK, partition_key=hour)
        for row in instances.to_dict("records"):
            if row["state"] != "succeeded":
                outcome.active += row["state"] not in ("failed", "cancelled")
                continue
            outputs = json.loads(str(row["outputs"]))
            log = json.loads(str(row["log"]))
            outcome.remediated[_remedy_line(outputs, log)] += 1
            outcome.remediated_hosts.add(str(row["entity_id"]))
            times = [dt.datetime.fromisoformat(entry["at"]) for entry in log]
            if times:
                outcome.resolution_seconds.append((max(times) - min(times)).total_seconds())
        queue = ledger.escalations(playbook=PLAYBOOK, partition_key=hour, status=None)
        for case in queue.to_dict("records"):
            data = json.loads(str(case["data"]))
            if case["kind"] == "rule":
                outcome.databases[str(case["entity_id"])] = float(data.get("anomaly_score", 0.0))
            elif case["kind"] == "workflow_failed":
                outcome.failed.append({"host_id": str(case["entity_id"]), **data})
        return outcome


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _remedy_line(outputs: Mapping[str, Any], log: Sequence[Mapping[str, Any]]) -> str:
    """What was found and done for one remediated host, in words a newcomer reads."""
    cause = str((outputs.get("diagnose") or {}).get("cause", "?"))
    done = {entry["step"] for entry in log if entry.get("outcome") == "succeeded"}
    checks = [
        entry for entry in log if entry["step"] == "verify" and entry["outcome"] == "succeeded"
    ]
    found = {
        "service_hung": "service hung: restarted",
        "disk_full": "disk full: disk cleaned",
        "none": "no fault found",
    }.get(cause, f"diagnosis {cause}")
    if cause == "service_hung" and "restart" not in done:
        found = "service hung"
    if cause == "disk_full" and "clean_disk" not in done:
        found = "disk full"
    first = dt.datetime.fromisoformat(checks[0]["at"]) if checks else None
    last = dt.datetime.fromisoformat(checks[-1]["at"]) if checks else None
    later = (
        f", {_clock_text((last - first).total_seconds())} after the first"
        if first and last and last > first
        else ""
    )
    return f"{found}; healthy at the {_ordinal(len(checks))} health check{later}; reinstated"


def _evidence_text(case: Mapping[str, Any]) -> tuple[str, str]:
    """What a person reads first: what the diagnosis found, and what was tried and how it ended,
    from the evidence the escalation carries."""
    outputs: Mapping[str, Any] = case.get("outputs") or {}
    evidence: Sequence[Mapping[str, Any]] = case.get("evidence") or []
    diagnosis = outputs.get("diagnose") or {}
    skipped = [str(e["step"]) for e in evidence if e.get("outcome") == "skipped"]
    checks = [e for e in evidence if e.get("step") == "verify" and e.get("outcome") == "succeeded"]
    failure = next((e for e in reversed(evidence) if e.get("outcome") == "failed"), {})
    # The message also names the attempts, the timeout and the last output: shown already.
    why = str(failure.get("detail", "failed")).split(": `", 1)[0]
    why = why.removeprefix("step 'verify': ").split(" after ", 1)[0]
    tried = f"no remedy applies ({', '.join(skipped)} skipped); " if skipped else ""
    span = ""
    if len(checks) > 1:
        first, last = (dt.datetime.fromisoformat(str(checks[i]["at"])) for i in (0, -1))
        span = f" over {_clock_text((last - first).total_seconds())}"
    last_status = (outputs.get("verify") or {}).get("status", "?")
    return (
        f"diagnosis {diagnosis.get('cause', '?')}: {diagnosis.get('detail', 'none recorded')}",
        f"{tried}{len(checks)} health checks{span}, still {last_status}: {why}",
    )


def train(instance: "dg.DagsterInstance", *, run_config: Mapping[str, Any]) -> None:
    """Materialize the fleet's history and the anomaly model unless it was trained before.

    Raises:
        SystemExit: The training run failed.
    """
    from assets import host_anomaly_model, host_assets, host_metrics_history

    metadata = train_once(
        instance,
        assets=host_assets,
        selection=[host_metrics_history, host_anomaly_model],
        model=host_anomaly_model,
        announce="training: 48 fault-free hours of 2,000 hosts; an IsolationForest on them",
        run_config=run_config,
    )
    if metadata is not None:
        say(
            f"training: host_anomaly_model precision {metadata['precision_at_threshold']:.2f}, "
            f"recall {metadata['recall_at_threshold']:.2f} at anomaly_score >= 0.8, on "
            f"{metadata['evaluation_faults']:,} injected faults in 24 hours it never saw"
        )


def score(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    hour: str,
    *,
    run_config: Mapping[str, Any],
) -> int:
    """Materialize one host_anomalies partition with its checks (the scoring job).

    Returns:
        Hosts scored.

    Raises:
        SystemExit: The scoring run or a blocking check failed.
    """
    from assets import host_anomalies

    again = hour in instance.get_materialized_partitions(host_anomalies.key)
    say(
        f"scoring: {hour}, every host's metrics with the anomaly model"
        + (" (scored before: the same model output arrives again)" if again else "")
    )
    result = defs.resolve_job_def(SCORING_JOB).execute_in_process(
        partition_key=hour, instance=instance, run_config=run_config, raise_on_error=False
    )
    checks = ", ".join(
        f"{e.check_name} {'passed' if e.passed else 'FAILED'}"
        for e in result.get_asset_check_evaluations()
    )
    if not result.success:
        raise SystemExit(f"scoring {hour} failed ({checks}): see run {result.run_id}")
    metadata = result.asset_materializations_for_node("host_anomalies")[0].metadata
    per_role = metadata["flagged_per_role"].value
    roles = ", ".join(f"{n} {role}" for role, n in per_role.items() if n)  # type: ignore[union-attr]
    say(
        f"scoring: {metadata['dagster/row_count'].value:,} hosts scored, "
        f"{metadata['flagged'].value:,} anomalous ({roles}); checks: {checks}"
    )
    return int(metadata["dagster/row_count"].value)  # type: ignore[arg-type]


def _flow_text(flow: Mapping[str, Any] | None) -> str:
    if not flow:
        return "no workflow work"
    steps: Mapping[str, Mapping[str, int]] = flow.get("by_step") or {}
    delivered = {s: t.get("delivered", 0) for s, t in steps.items() if t.get("delivered", 0)}
    parts = [f"{flow.get('steps_delivered', 0):,} steps sent"]
    if set(delivered) == {"verify"}:
        parts = [f"{delivered['verify']:,} health checks"]
    if flow.get("succeeded"):
        parts.append(f"{flow['succeeded']:,} reinstated")
    if flow.get("failed"):
        parts.append(f"{flow['failed']:,} failed and escalated")
    parts.append(f"{flow.get('waiting', 0):,} waiting")
    return ", ".join(parts)


def execute_new_hours(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    home: Path,
    *,
    run_config: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Evaluate the execution sensor as the daemon would and execute each run it requests.

    Returns:
        The execution report of each run (``ExecutionReport.as_dict()``).

    Raises:
        SystemExit: An execution run failed.
    """
    cursor_file = cursor_path(home, SENSOR_NAME)
    result = tick(defs, instance, SENSOR_NAME, cursor=load_cursor(cursor_file))
    if not result.requests:
        say(f"sensor: no run requested ({result.skip_reason or 'nothing new'})")
    reports = []
    for request in result.requests:
        say(
            f"executing: {PLAYBOOK} on host_anomalies {request.partition_key}, as "
            f"{SENSOR_NAME} requested (run key {request.run_key})"
        )
        began = time.monotonic()
        run = execute_request(defs, instance, SENSOR_NAME, request, config=run_config)
        report = run.output_for_node(EXECUTION_NODE, "actions")
        started = int(report.get("workflows_started", 0))
        escalated = int(report.get("escalated", 0))
        say(
            f"executing: run {run.run_id[:8]} finished in {time.monotonic() - began:.1f} s: "
            f"{started:,} workflows started, {escalated:,} escalated at once; "
            f"{_flow_text(report.get('workflows'))}"
        )
        reports.append(report)
    store_cursor(cursor_file, result.cursor)
    return reports


@dataclass
class _Quiet:
    """Consecutive advance runs in which nothing finished, printed as one line."""

    runs: int = 0
    checks: int = 0
    first: float = 0.0
    last: float = 0.0
    waiting: int = 0

    def add(self, offset: float, flow: Mapping[str, Any]) -> None:
        self.first = offset if not self.runs else self.first
        self.runs += 1
        self.checks += int(flow.get("steps_delivered", 0))
        self.last = offset
        self.waiting = int(flow.get("waiting", 0))

    def flush(self) -> None:
        if self.runs:
            say(
                f"advancing: {self.runs} more runs from +{_clock_text(self.first)} to "
                f"+{_clock_text(self.last)}: {self.checks:,} health checks, every host still "
                f"degraded; {self.waiting:,} waiting"
            )
        self.runs = self.checks = 0


def advance_until_done(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    ledger: "ActionLedger",
    clock: DemoClock,
    home: Path,
    *,
    run_config: Mapping[str, Any],
    start: dt.datetime,
) -> list[dict[str, Any]]:
    """Move the clock to each next due time and run what the workflows sensor requests.

    Where the definitions hold no workflows sensor, the demo requests what that sensor would:
    the execution job for each partition the ledger reports due work for (a re-run of a
    partition starts nothing twice and advances its due instances).

    Returns:
        The execution report of each advance run.

    Raises:
        SystemExit: A run failed, or workflows are still due after the deadline.
    """
    import dagster as dg

    has_sensor = any(s.name == WORKFLOWS_SENSOR_NAME for s in defs.sensors or [])
    source = WORKFLOWS_SENSOR_NAME if has_sensor else SENSOR_NAME
    cursor_file = cursor_path(home, WORKFLOWS_SENSOR_NAME)
    cursor = load_cursor(cursor_file) if has_sensor else None
    deadline = time.monotonic() + ADVANCE_DEADLINE_SECONDS
    reports: list[dict[str, Any]] = []
    quiet = _Quiet()
    while (due := ledger.next_due(playbook=PLAYBOOK)) is not None:
        if time.monotonic() > deadline or len(reports) >= MAX_ADVANCE_RUNS:
            raise SystemExit(
                f"workflows still due after {len(reports)} advance runs; see "
                f"`.venv/bin/autoexec workflows --playbook {PLAYBOOK}`"
            )
        now = clock.move_to(_aware(due))
        offset = (now - start).total_seconds()
        if has_sensor:
            result = tick(defs, instance, WORKFLOWS_SENSOR_NAME, cursor=cursor)
            cursor, requests = result.cursor, result.requests
        else:
            requests = [
                dg.RunRequest(
                    run_key=f"{PLAYBOOK}:{partition}:due:{earliest.isoformat()}",
                    partition_key=partition,
                    tags={"autoexec/playbook": PLAYBOOK},
                )
                for partition, _n, earliest in ledger.due_partitions(playbook=PLAYBOOK)
            ]
        if not requests:
            raise SystemExit(
                f"work is due at {now:%H:%M:%S} but {source} requested no run; see "
                f"`.venv/bin/autoexec workflows --playbook {PLAYBOOK}`"
            )
        for request in requests:
            run = execute_request(defs, instance, source, request, config=run_config)
            report = run.output_for_node(EXECUTION_NODE, "actions")
            flow = report.get("workflows") or {}
            reports.append(report)
            # Print what changed; a run that only polled joins the next summary line.
            if flow.get("succeeded") or flow.get("failed") or len(reports) == 1:
                quiet.flush()
                say(
                    f"advancing: clock +{_clock_text(offset)}, run {run.run_id[:8]} "
                    f"({request.partition_key}): {_flow_text(flow)}"
                )
            else:
                quiet.add(offset, flow)
    quiet.flush()
    if has_sensor:
        store_cursor(cursor_file, cursor)
    return reports


def _succeeded_steps(ledger: "ActionLedger") -> set[str]:
    steps = ledger.actions(playbook=PLAYBOOK, states=["succeeded"])
    return set(steps.loc[steps["decision"] == "step", "idempotency_key"].astype(str))


def print_summary(
    outcome: HostOutcome,
    *,
    scored: int,
    reports: Sequence[Mapping[str, Any]],
    record: ApiRecord,
    api_db: Path,
    ledger_url: str,
) -> None:
    """Print the hour's outcome, the API's record and where to look further."""
    print()
    print(f"Host remediation for {outcome.hour}")
    started = sum(int(r.get("workflows_started", 0)) for r in reports)
    steps = sum(int((r.get("workflows") or {}).get("steps_delivered", 0)) for r in reports)
    if started or steps:
        print(
            f"  this run: {started:,} workflows started, {steps:,} steps sent to the "
            f"infrastructure API in {len(reports)} runs"
        )
    else:
        print(
            f"  this run: 0 steps sent: all {outcome.flagged:,} anomalous hosts were handled in "
            "an earlier run, nothing was sent twice"
        )
    print(count_line("hosts scored", scored, width=WIDTH))
    print(count_line("anomalous hosts", outcome.flagged, "(anomaly_score >= 0.8)", width=WIDTH))
    print(
        count_line(
            "remediated and verified",
            len(outcome.remediated_hosts),
            "back in service without a person",
            width=WIDTH,
        )
    )
    for line, n in outcome.remediated.most_common():
        print(f"      {n:>6,}  {line}")
    print(
        count_line(
            "escalated with evidence",
            len(outcome.failed),
            "Remediation did not restore the host",
            width=WIDTH,
        )
    )
    # Hosts with the same evidence are listed together: a person reads each story once.
    stories: dict[tuple[str, str], list[str]] = {}
    for case in outcome.failed:
        stories.setdefault(_evidence_text(case), []).append(str(case["host_id"]))
    for (found, tried), hosts in stories.items():
        shown = ", ".join(hosts[:LISTED_ESCALATIONS])
        more = (
            f" and {len(hosts) - LISTED_ESCALATIONS} more"
            if len(hosts) > LISTED_ESCALATIONS
            else ""
        )
        print(f"      {len(hosts):>6,}  {shown}{more}")
        print(f"              {found}")
        print(f"              {tried}; left isolated")
    print(
        count_line(
            "database hosts, escalated at once",
            len(outcome.databases),
            "Database host: a person decides",
            width=WIDTH,
        )
    )
    if outcome.databases:
        hosts = ", ".join(f"{h} ({s:.2f})" for h, s in sorted(outcome.databases.items()))
        print(f"          untouched: {hosts}")
    if outcome.active:
        print(count_line("still in progress", outcome.active, "(run the demo again)", width=WIDTH))
    rate = len(outcome.remediated_hosts) / outcome.flagged if outcome.flagged else None
    print(count_line("autonomy rate", f"{rate:.1%}" if rate is not None else "-", width=WIDTH))
    if outcome.resolution_seconds:
        ordered = sorted(outcome.resolution_seconds)
        median = ordered[len(ordered) // 2]
        print(
            count_line(
                "isolation to reinstatement",
                _clock_text(median),
                f"median (longest {_clock_text(ordered[-1])}), on the demo clock",
                width=WIDTH,
            )
        )
    print()
    calls = ", ".join(f"{n:,} {outcome_}" for outcome_, n in record.outcomes.most_common())
    print(f"Infrastructure API: {record.calls:,} calls ({calls}) in {api_db}")
    print("  its tables: hosts (each host's state), calls (every request), replies (one per key)")
    print()
    print("Look further:")
    env = "" if ledger_url == project_ledger_url() else f"AUTOEXEC_LEDGER_URL={ledger_url} "
    print(f"  {env}.venv/bin/autoexec workflows --playbook {PLAYBOOK} --partition {outcome.hour}")
    print(f"  {env}.venv/bin/autoexec escalations --playbook {PLAYBOOK}")
    example = outcome.failed[0]["host_id"] if outcome.failed else None
    if example:
        print(f"  {env}.venv/bin/autoexec history {example}    # every step, output, escalation")
    print(f"  sqlite3 {api_db} 'SELECT state, count(*) FROM hosts GROUP BY state'")
    print("  make ui    # the asset graph, run history and the host_remediation/* metadata")


def check_record(
    ledger: "ActionLedger",
    outcome: HostOutcome,
    record: ApiRecord,
    *,
    executed_before: int,
    succeeded_before: int,
) -> bool:
    """Compare the infrastructure API's own record with the ledger.

    Args:
        ledger: The action ledger.
        outcome: The hour's outcome from the ledger.
        record: The API's record after the runs.
        executed_before: Keys the API had executed when the demo started.
        succeeded_before: Succeeded step attempts in the ledger when the demo started.

    Returns:
        True when every comparison holds; each is printed.
    """
    succeeded = _succeeded_steps(ledger)
    executed = set(record.executed)
    in_service = {
        h
        for h in outcome.remediated_hosts
        if (record.hosts.get(h) or {}).get("state") == "in_service"
        and record.last_health.get(h) == "healthy"
    }
    failed_hosts = {case["host_id"] for case in outcome.failed}
    isolated = {h for h in failed_hosts if (record.hosts.get(h) or {}).get("state") == "isolated"}
    twice = sum(1 for n in record.executed.values() if n > 1)
    print()
    checks = [
        (
            "steps the API executed in this run",
            len(executed) - executed_before,
            "step attempts the ledger completed in this run",
            len(succeeded) - succeeded_before,
        ),
        (
            "step keys the API executed",
            len(executed),
            "succeeded step attempts in the ledger",
            len(succeeded),
        ),
        ("keys in only one of the two records", len(executed ^ succeeded), "none", 0),
        ("keys the API executed more than once", twice, "none", 0),
        (
            "reinstated hosts in service and healthy, per the API",
            len(in_service),
            "workflows that succeeded",
            len(outcome.remediated_hosts),
        ),
        (
            "hosts the API keeps isolated",
            len(isolated),
            "hosts escalated after a failed remedy",
            len(failed_hosts),
        ),
        (
            "calls about database hosts",
            len(record.hosts_called & set(outcome.databases)),
            "none",
            0,
        ),
    ]
    return all([check_line(*check) for check in checks])


def run(hour: str, *, verbose: bool = False) -> int:
    """Run the host story for one host_anomalies partition.

    Args:
        hour: The hour to score and act on, a Dagster hourly key (``2026-12-01-10:00``).
        verbose: Show Dagster's INFO logs.

    Returns:
        The exit code: 0 when everything ran and the API's record agrees with the ledger.
    """
    home = prepare_dagster_home()
    ensure_infra_secret()
    say("hosts: loading the deployment (Dagster, scikit-learn, the host assets, autoexec_dagster)")
    from resources.channels import default_ledger_url, var_dir
    from resources.host_channels import infra_db_path

    var = var_dir()
    var.mkdir(parents=True, exist_ok=True)
    api_db, ledger_url = infra_db_path(), default_ledger_url()
    clock = DemoClock(var / CLOCK_FILE_NAME)
    start = clock.start()
    with ExitStack() as stack:
        # Started before the rest of the deployment is imported: the API process loads the host
        # inventory (scikit-learn, Dagster) meanwhile.
        api = InfraApiProcess(db=api_db, clock_file=clock.path, log_file=var / API_LOG_NAME)
        stack.callback(api.stop)

        import dagster as dg

        from assets import hourly_partitions
        from autoexec_dagster import ActionLedger
        from definitions import build_defs
        from resources.host_channels import host_channels
        from sensors import build_host_remediation_execution_defs

        if not hourly_partitions.has_partition_key(hour):
            keys = hourly_partitions.get_partition_keys()
            span = f"{keys[0]} to {keys[-1]}" if keys else "none yet"
            raise SystemExit(f"{hour} is not a host_anomalies partition (valid: {span})")
        config = make_run_config(verbose)
        ready = api.wait_ready()
        say(
            f"infrastructure API: its own process (pid {ready['pid']}) on {ready['url']} -> "
            f"{api_db}; 5% of calls fail with 503 and are retried"
        )
        say(
            f"clock: {start:%Y-%m-%d %H:%M:%S} UTC, injected: the ledger and the API read "
            f"{clock.path}; the demo moves it to each next due time instead of waiting"
        )
        ledger = ActionLedger(ledger_url, clock=clock.read)
        stack.callback(ledger.dispose)
        say(f"ledger: {ledger.display_url}")
        executed_before = len(ApiRecord.read(api_db).executed)
        succeeded_before = len(_succeeded_steps(ledger))
        defs = build_defs(
            host_execution=build_host_remediation_execution_defs(
                channels=host_channels(urls=ready["urls"]), ledger=ledger
            )
        )
        instance = stack.enter_context(dg.DagsterInstance.get())
        train(instance, run_config=config)
        scored = score(defs, instance, hour, run_config=config)
        reports = execute_new_hours(defs, instance, home, run_config=config)
        reports += advance_until_done(
            defs, instance, ledger, clock, home, run_config=config, start=start
        )
        outcome = HostOutcome.from_ledger(ledger, hour)
        record = ApiRecord.read(api_db)
        print_summary(
            outcome,
            scored=scored,
            reports=reports,
            record=record,
            api_db=api_db,
            ledger_url=ledger_url,
        )
        ok = check_record(
            ledger,
            outcome,
            record,
            executed_before=executed_before,
            succeeded_before=succeeded_before,
        )
    say("done" if ok else "done, but the API's record disagrees with the ledger (see above)")
    return 0 if ok else 1
