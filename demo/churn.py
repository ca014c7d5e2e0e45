"""The churn story of the demo (``python -m demo churn``), end to end, in one process.

1. Start the local destinations: an SMTP sink filing each email into ``var/mailbox`` and a CRM
   taking signed webhooks into ``var/crm.sqlite`` (free ports on 127.0.0.1, stopped on exit).
2. Use the Dagster instance at ``$DAGSTER_HOME`` (default ``.dagster_home``): train the churn
   model once, then score one day (``--partition``) with the blocking checks of the execution
   layer: the model output "arriving".
3. Evaluate the execution sensor the way the daemon would, with its cursor kept in the instance
   folder, and run the execution job in process for each run it requests.
4. Print what happened: flagged, acted autonomously, escalated and why, held out, failed, the
   autonomy rate, and where the emails and CRM tasks are, after checking that the mailbox holds
   exactly as many messages as the ledger recorded as sent.
5. Observe the outcomes (``churn_outcomes``, simulated with known true effects) of the days from
   the partition on, as far as days have ended, run the outcomes job for each, and print where the
   retention_offer experiment stands and how the emails compare with the held-out customers.

The ledger runs on the partition's calendar (09:00 UTC of the scored day, then the end of each
outcome day): the exposures and the outcomes observed after them fall on the days of
``churn_scores``, as they would in a deployment that scores each day as it ends.

Running it again for the same day scores the same data again; the sensor requests a run, and
that run sends nothing because the ledger already holds every action: the demo says so.
"""

import datetime as dt
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demo import ensure_crm_secret, prepare_dagster_home
from demo.runs import (
    count_line,
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

DEFAULT_PARTITION = "2026-11-24"
PLAYBOOK = "churn_outreach"
SENSOR_NAME = f"{PLAYBOOK}_sensor"
SCORING_JOB = "churn_scoring_job"
# The storage ids in the cursor belong to one instance's event log, so the cursor lives with it.
# The name predates the host story; kept so an existing instance folder keeps its cursor.
CURSOR_FILE_NAME = "autoexec_demo_sensor_cursor.json"
OUTCOMES_JOB = f"{PLAYBOOK}_outcomes_job"
EXPERIMENT = "retention_offer"
# Customers are scored in the morning; the last outcome of a day's exposure comes 13.5 days on.
SCORED_AT = dt.time(9, 0)
OUTCOME_DAYS = 14


class PartitionClock:
    """The ledger's clock on the partition's calendar: a set moment plus the real time since.

    Moving with real time keeps leases and timeouts working inside one run; :meth:`move_to`
    jumps to a later moment of the calendar (the end of an outcome day).
    """

    def __init__(self, start: dt.datetime) -> None:
        self._start = start
        self._began = time.monotonic()

    def __call__(self) -> dt.datetime:
        return self._start + dt.timedelta(seconds=time.monotonic() - self._began)

    def move_to(self, moment: dt.datetime) -> None:
        """Continue from ``moment``."""
        self._start, self._began = moment, time.monotonic()

    @classmethod
    def scored(cls, partition: str) -> "PartitionClock":
        """The morning the partition was scored, 09:00 UTC."""
        return cls(dt.datetime.combine(dt.date.fromisoformat(partition), SCORED_AT, tzinfo=dt.UTC))


@dataclass
class PartitionOutcome:
    """One partition's actions as the ledger records them, whichever run executed them.

    Attributes:
        partition: The churn_scores partition.
        flagged: Customers the playbook flagged (acted on, escalated or held out), not
            counting those still waiting on an escalation from an earlier day.
        still_open: Flagged customers whose escalation from an earlier day is still open.
        sent: Delivered actions per action name.
        cooled_down: Actions not repeated because the customer got the same one recently.
        escalated: Escalations per reason.
        held_out: Customers in the control group.
        failed: Actions that failed.
        pending: Actions not finished (reserved, sending or in doubt).
    """

    partition: str
    flagged: int = 0
    sent: Counter[str] = field(default_factory=Counter)
    cooled_down: int = 0
    escalated: Counter[str] = field(default_factory=Counter)
    still_open: int = 0
    held_out: int = 0
    failed: int = 0
    pending: int = 0

    @property
    def autonomous(self) -> int:
        """Flagged customers handled without a person."""
        return sum(self.sent.values()) + self.cooled_down

    @property
    def autonomy_rate(self) -> float | None:
        """Share of flagged customers outside the control group handled without a person."""
        treated = self.flagged - self.held_out
        return self.autonomous / treated if treated else None

    @classmethod
    def from_ledger(cls, ledger: "ActionLedger", partition: str) -> "PartitionOutcome":
        """Read the partition's outcome from the ledger, with the query the Dagster metadata
        and ``autoexec summary`` use, so the three agree.

        Args:
            ledger: The action ledger.
            partition: The churn_scores partition.

        Returns:
            The counts.
        """
        totals = ledger.partition_outcome(playbook=PLAYBOOK, partition_key=partition)
        outcome = cls(partition)
        outcome.flagged = totals.flagged - totals.still_open
        outcome.still_open = totals.still_open
        for action, tally in totals.by_action.items():
            if tally.get("succeeded"):
                outcome.sent[action] = tally["succeeded"]
        outcome.cooled_down = totals.cooled_down
        outcome.held_out = totals.held_out
        outcome.failed = totals.failed
        outcome.pending = totals.pending
        escalations = ledger.escalations(playbook=PLAYBOOK, partition_key=partition, status=None)
        rules = escalations[escalations["kind"] != "delivery_failed"]
        outcome.escalated.update(str(reason) for reason in rules["reason"])
        return outcome


def train(instance: "dg.DagsterInstance", *, run_config: Mapping[str, Any]) -> None:
    """Materialize raw_customers and churn_model unless the model was trained before.

    Raises:
        SystemExit: The training run failed.
    """
    from assets import churn_assets, churn_model, raw_customers

    metadata = train_once(
        instance,
        assets=churn_assets,
        selection=[raw_customers, churn_model],
        model=churn_model,
        announce="training: generating 50,000 labelled customers and training the churn model",
        run_config=run_config,
    )
    if metadata is not None:
        say(
            f"training: churn_model ROC AUC {metadata['roc_auc']:.3f} on "
            f"{metadata['test_rows']:,} held-out customers"
        )


def score(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    partition: str,
    *,
    run_config: Mapping[str, Any],
) -> None:
    """Materialize one churn_scores partition with its checks (the scoring job).

    Raises:
        SystemExit: The scoring run or a blocking check failed.
    """
    from assets import churn_scores

    again = partition in instance.get_materialized_partitions(churn_scores.key)
    say(
        f"scoring: {partition}, every customer with the churn model"
        + (" (scored before: the same model output arrives again)" if again else "")
    )
    result = defs.resolve_job_def(SCORING_JOB).execute_in_process(
        partition_key=partition, instance=instance, run_config=run_config, raise_on_error=False
    )
    checks = ", ".join(
        f"{e.check_name} {'passed' if e.passed else 'FAILED'}"
        for e in result.get_asset_check_evaluations()
    )
    if not result.success:
        raise SystemExit(f"scoring {partition} failed ({checks}): see run {result.run_id}")
    metadata = result.asset_materializations_for_node("churn_scores")[0].metadata
    say(
        f"scoring: {metadata['dagster/row_count'].value:,} customers scored, "
        f"{metadata['flagged'].value:,} at or above the flag threshold; checks: {checks}"
    )


def execute_requested_runs(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    cursor_file: Path,
    *,
    run_config: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Evaluate the execution sensor as the daemon would and execute each run it requests.

    The cursor is stored only after every requested run succeeded, so a failed run is requested
    again by the next demo (and re-executing sends nothing already sent).

    Returns:
        The execution report (``ExecutionReport.as_dict()``) of each run, in request order.

    Raises:
        SystemExit: An execution run failed.
    """
    result = tick(defs, instance, SENSOR_NAME, cursor=load_cursor(cursor_file))
    if not result.requests:
        say(f"sensor: no run requested ({result.skip_reason or 'nothing new'})")
    reports = []
    for request in result.requests:
        say(
            f"executing: {PLAYBOOK} on churn_scores {request.partition_key}, as "
            f"{SENSOR_NAME} requested (run key {request.run_key})"
        )
        began = time.monotonic()
        run = execute_request(defs, instance, SENSOR_NAME, request, config=run_config)
        report = run.output_for_node(f"{PLAYBOOK}_execution", "actions")
        say(
            f"executing: run {run.run_id[:8]} finished in {time.monotonic() - began:.1f} s "
            f"(channels busy {report['duration_seconds']:.1f} s)"
        )
        reports.append(report)
    store_cursor(cursor_file, result.cursor)
    return reports


def describe_run(report: Mapping[str, Any]) -> str:
    """What one execution run did, in one line: new actions, or that all were done before."""
    by_action: Mapping[str, Mapping[str, int]] = report.get("by_action") or {}
    new = {a: t.get("succeeded", 0) for a, t in by_action.items() if t.get("succeeded", 0)}
    done = sum(t.get("already_done", 0) for t in by_action.values())
    opened = int(report.get("escalated", 0))
    if not new and done:
        return (
            f"0 new actions: all {done:,} already done in an earlier run, nothing was sent "
            "twice" + (f" ({opened:,} new escalations)" if opened else "")
        )
    parts = ", ".join(f"{n:,} {a}" for a, n in sorted(new.items())) or "none"
    return f"{sum(new.values()):,} new actions sent ({parts}), {opened:,} escalations opened"


def print_summary(
    outcome: PartitionOutcome,
    *,
    reports: Sequence[Mapping[str, Any]],
    mailbox: Path,
    crm_tasks: int,
    ledger_url: str,
) -> None:
    """Print the partition's outcome and where to look further."""
    print()
    print(f"Churn outreach for {outcome.partition}")
    for report in reports:
        if report.get("partition_key") == outcome.partition:
            print(f"  this run: {describe_run(report)}")
    print(count_line("customers flagged", outcome.flagged))
    sent = ", ".join(f"{n:,} {a}" for a, n in sorted(outcome.sent.items()))
    cooled = f", {outcome.cooled_down:,} not repeated (cooldown)" if outcome.cooled_down else ""
    print(count_line("acted autonomously", outcome.autonomous, f"({sent}{cooled})"))
    print(count_line("escalated to a person", outcome.escalated.total()))
    for reason, n in outcome.escalated.most_common():
        print(f"      {n:>6,}  {reason}")
    if outcome.still_open:
        print(
            count_line(
                "still with a person",
                outcome.still_open,
                "(escalated on an earlier day, not again)",
            )
        )
    print(count_line("held out (control group)", outcome.held_out))
    print(count_line("failed", outcome.failed))
    if outcome.pending:
        print(count_line("pending", outcome.pending, "(not finished; run the demo again)"))
    rate = outcome.autonomy_rate
    print(count_line("autonomy rate", f"{rate:.1%}" if rate is not None else "-"))
    print()
    emails = len(list(mailbox.glob("*.eml")))
    print(f"Emails: {emails:,} .eml files in {mailbox}")
    print(f"CRM tasks: {crm_tasks:,} (SQLite table crm_tasks)")
    print()
    print("Look further:")
    # The CLI finds var/autoexec_ledger.db by itself when run from the project folder.
    env = "" if ledger_url == project_ledger_url() else f"AUTOEXEC_LEDGER_URL={ledger_url} "
    print(
        f"  {env}.venv/bin/autoexec summary --playbook {PLAYBOOK} --partition {outcome.partition}"
    )
    print(f"  {env}.venv/bin/autoexec escalations --playbook {PLAYBOOK}")
    print("  make ui    # the asset graph, run history and the churn_outreach/* metadata")


def check_deliveries(
    ledger: "ActionLedger", *, mailbox: Path, crm_tasks: int, new_emails: int, received: int
) -> bool:
    """Compare what the receivers got with what the ledger says was delivered.

    Args:
        ledger: The action ledger.
        mailbox: The SMTP sink's folder (one file per distinct message).
        crm_tasks: Tasks in the CRM database.
        new_emails: retention_email actions this demo run delivered, per the run reports.
        received: Messages the SMTP sink accepted during this demo run.

    Returns:
        True when every count matches; each comparison is printed.
    """
    summary = ledger.summary(playbook=PLAYBOOK)
    succeeded = summary[summary["state"] == "succeeded"].groupby("action")["count"].sum()
    ledger_emails = int(succeeded.get("retention_email", 0))
    ledger_tasks = int(succeeded.get("crm_task", 0))
    emails = len(list(mailbox.glob("*.eml")))
    checks = [
        ("SMTP messages received in this run", received, "emails the ledger sent now", new_emails),
        ("mailbox .eml files", emails, "succeeded retention_email in the ledger", ledger_emails),
        ("CRM tasks", crm_tasks, "succeeded crm_task in the ledger", ledger_tasks),
    ]
    ok = True
    print()
    for left, a, right, b in checks:
        mark = "==" if a == b else "!="
        print(f"check: {left} ({a:,}) {mark} {right} ({b:,})" + ("" if a == b else "  MISMATCH"))
        ok = ok and a == b
    return ok


def outcome_days(partition: str, last: str | None) -> list[str]:
    """The days outcomes of the partition's exposures can fall on that have ended already."""
    first = dt.date.fromisoformat(partition)
    days = [(first + dt.timedelta(days=i)).isoformat() for i in range(OUTCOME_DAYS)]
    return [day for day in days if last is not None and day <= last]


def observe_outcomes(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    ledger: "ActionLedger",
    clock: PartitionClock,
    days: Sequence[str],
    *,
    run_config: Mapping[str, Any],
) -> tuple[Mapping[str, Any] | None, int]:
    """Materialize churn_outcomes for each day, then update the experiment with all of them.

    The outcomes sensor would run the outcomes job once per day; on a demo's cold start that is
    seconds per day, so the earlier days' outcomes are stored in the ledger directly and the job
    runs once, on the last day, with the ledger's clock at that day's end: the experiment then
    reads every stored outcome, as the last of the daily runs would.

    Returns:
        The metadata of the ``churn_outreach/experiment`` materialization (None without days)
        and the number of outcomes observed.

    Raises:
        SystemExit: A run failed.
    """
    import dagster as dg

    from assets import churn_outcomes
    from autoexec_dagster import Playbook, record_outcomes
    from resources import CHURN_PLAYBOOK_PATH

    if not days:
        return None, 0
    playbook = Playbook.from_yaml(CHURN_PLAYBOOK_PATH)
    observed = 0
    for day in days:
        stored = dg.materialize(
            [churn_outcomes], instance=instance, partition_key=day, run_config=run_config
        )
        if not stored.success:
            raise SystemExit(f"churn_outcomes {day} failed: see run {stored.run_id}")
        outcomes = stored.output_for_node("churn_outcomes")
        observed += len(outcomes)
        if day != days[-1]:
            record_outcomes(playbook=playbook, ledger=ledger, outcomes=outcomes)
    last = dt.date.fromisoformat(days[-1])
    clock.move_to(dt.datetime.combine(last, dt.time(23, 59), tzinfo=dt.UTC))
    result = defs.resolve_job_def(OUTCOMES_JOB).execute_in_process(
        partition_key=days[-1], instance=instance, run_config=run_config, raise_on_error=False
    )
    if not result.success:
        raise SystemExit(f"{OUTCOMES_JOB} {days[-1]} failed: see run {result.run_id}")
    say(
        f"outcomes: {observed:,} customers' outcomes observed from {days[0]} to {days[-1]}; "
        f"{OUTCOMES_JOB} updated the experiment with them"
    )
    for event in result.get_asset_materialization_events():
        if event.materialization.asset_key == dg.AssetKey([PLAYBOOK, "experiment"]):
            return {k: v.value for k, v in event.materialization.metadata.items()}, observed
    return None, observed


def print_experiment(
    metadata: Mapping[str, Any] | None, days: Sequence[str], *, observed: int, exposed: int
) -> None:
    """Where the experiment stands: its status, each variant's figures, the holdout, and how
    many of the exposed customers' outcomes have come in."""
    print()
    if metadata is None:
        print(f"Experiment {EXPERIMENT}: no outcome day has ended yet")
        return
    print(f"Experiment {EXPERIMENT} after the outcomes of {days[0]} to {days[-1]}")
    print(
        f"  status: {metadata['status']}"
        + (f", winner {metadata['winner']}" if metadata["winner"] else "")
    )
    print(f"  decision: {metadata['decision']}")
    variants = sorted(str(k).split("/", 1)[1] for k in metadata if str(k).startswith("n/"))
    print(f"  {'variant':<12} {'customers':>9} {'retained':>9} {'P(best)':>8} {'next weight':>12}")
    for variant in variants:
        print(
            f"  {variant:<12} {int(metadata[f'n/{variant}']):>9,} "
            f"{float(metadata[f'rate/{variant}']):>9.1%} "
            f"{float(metadata[f'probability_best/{variant}']):>8.2f} "
            f"{float(metadata[f'weight/{variant}']):>12.2f}"
        )
    print(
        f"  {'held out':<12} {int(metadata['holdout_n']):>9,} "
        f"{float(metadata['holdout_rate']):>9.1%}   (no email: the control group)"
    )
    print(
        f"  outcomes so far: {observed:,} of the {exposed:,} customers exposed; until a "
        "customer's outcome comes (within 14 days) it counts as not retained"
    )


def run(partition: str, *, verbose: bool = False) -> int:
    """Run the churn story for one churn_scores partition.

    Args:
        partition: The day to score and act on, ``YYYY-MM-DD``.
        verbose: Show Dagster's INFO logs.

    Returns:
        The exit code: 0 when everything ran and the receivers agree with the ledger.
    """
    home = prepare_dagster_home()
    secret = ensure_crm_secret()
    say("churn: loading the deployment (Dagster, scikit-learn, the churn assets, autoexec_dagster)")

    import dagster as dg

    from assets import daily_partitions
    from autoexec_dagster import ActionLedger
    from definitions import build_defs
    from resources.channels import (
        churn_channels,
        crm_db_path,
        default_ledger_url,
        mailbox_dir,
        var_dir,
    )
    from resources.local_receivers import CrmReceiver, SmtpSink
    from sensors import build_churn_execution_defs

    if not daily_partitions.has_partition_key(partition):
        keys = daily_partitions.get_partition_keys()
        span = f"{keys[0]} to {keys[-1]}" if keys else "none yet"
        raise SystemExit(f"{partition} is not a churn_scores partition (valid: {span})")
    var_dir().mkdir(parents=True, exist_ok=True)
    mailbox, ledger_url = mailbox_dir(), default_ledger_url()
    run_config = make_run_config(verbose)
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(mailbox))
        crm = stack.enter_context(CrmReceiver(secret, crm_db_path()))
        say(f"receivers: SMTP sink on 127.0.0.1:{sink.port} -> {mailbox}")
        say(f"receivers: CRM on {crm.url} -> {crm.db_path}")
        clock = PartitionClock.scored(partition)
        ledger = ActionLedger(ledger_url, clock=clock)
        stack.callback(ledger.dispose)
        say(f"ledger: {ledger.display_url}")
        say(f"ledger clock: the calendar of {partition}, from {clock():%H:%M} UTC")
        defs = build_defs(
            build_churn_execution_defs(
                channels=churn_channels(smtp_port=sink.port, crm_url=crm.url), ledger=ledger
            )
        )
        instance = stack.enter_context(dg.DagsterInstance.get())
        train(instance, run_config=run_config)
        score(defs, instance, partition, run_config=run_config)
        reports = execute_requested_runs(
            defs, instance, home / CURSOR_FILE_NAME, run_config=run_config
        )
        new_emails = sum(
            (r.get("by_action") or {}).get("retention_email", {}).get("succeeded", 0)
            for r in reports
        )
        outcome = PartitionOutcome.from_ledger(ledger, partition)
        print_summary(
            outcome,
            reports=reports,
            mailbox=mailbox,
            crm_tasks=crm.task_count(),
            ledger_url=ledger_url,
        )
        ok = check_deliveries(
            ledger,
            mailbox=mailbox,
            crm_tasks=crm.task_count(),
            new_emails=new_emails,
            received=sink.deliveries,
        )
        days = outcome_days(partition, daily_partitions.get_last_partition_key())
        metadata, observed = observe_outcomes(
            defs, instance, ledger, clock, days, run_config=run_config
        )
        exposed = int(ledger.exposures_frame(PLAYBOOK)["entity_id"].nunique())
        print_experiment(metadata, days, observed=observed, exposed=exposed)
    say("done" if ok else "done, but the receivers disagree with the ledger (see above)")
    return 0 if ok else 1
