"""The campaign-optimisation story of the demo (``python -m demo campaigns``): the continuous
optimisation loop over simulated days.

1. Start the local destinations: the SMTP sink of ``python -m resources.local_receivers`` (its
   own process, so the thousands of emails a day are received on the other core) filing the
   campaign emails into ``var/campaign_mailbox``, and in this process the tracking endpoint
   (:mod:`resources.tracking_server`) the emails' pixel and links lead to, its events in
   ``var/campaign_tracking.sqlite``. The story
   keeps its own ledger, ``var/campaign_ledger.db``, and starts it afresh on every run (a new
   experiment on a new calendar).
2. Each simulated day (12 from 2026-11-01 unless told otherwise), through the Dagster instance
   at ``$DAGSTER_HOME``:

   - 08:00: ``campaign_day_job`` materializes the day's campaign metrics, the click insight
     (campaigns below 0.8 of their segment's median) and the recipients of the flagged
     campaigns' next sends, with the execution layer's blocking checks;
   - ``campaign_optimisation_sensor`` is evaluated as the daemon would and the execution job it
     requests runs: each recipient outside the 10% holdout gets the email of the variant the
     ledger assigns them (Thompson sampling over the weights in force), through the SMTP sink;
   - the simulated audience (:mod:`resources.campaign_audience`) reads the emails that arrived
     and, at the true rates of :mod:`resources.campaign_variants`, opens, clicks and unsubscribes
     over real HTTP at simulated times during the next hours;
   - midnight: ``campaign_tracking_job`` materializes the day's outcomes from the tracking
     endpoint's events, and ``campaign_optimisation_outcomes_sensor`` requests the run that
     updates the experiment (``campaign_optimisation/experiment``, ``/learnings``, ``/uplift``):
     the next day's weights, and the promotion once a variant is clearly best.

3. Print the decision, the true best variant against the promoted one, the estimated lift
   against the true lift (with its interval), and the learnings; check the mailbox, the tracking
   endpoint, the audience and the ledger against each other. The exit status is 1 when a check
   fails.

Time. The ledger (exposures, assignments, the experiment's days), the tracking endpoint and the
audience all read the demo's clock, which jumps from one moment of the simulated calendar to the
next instead of waiting: twelve days take well under a minute.
"""

import datetime as dt
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demo import ensure_crm_secret, ensure_secret, prepare_dagster_home
from demo.runs import (
    check_line,
    cursor_path,
    execute_request,
    load_cursor,
    say,
    store_cursor,
    tick,
)
from demo.runs import run_config as make_run_config

if TYPE_CHECKING:
    import dagster as dg
    import pandas as pd

    from autoexec_dagster import ActionLedger
    from resources.campaign_audience import AudienceReport, SimulatedAudience
    from resources.tracking_server import TrackingServer

DEFAULT_START = "2026-11-01"
DEFAULT_DAYS = 12
PLAYBOOK = "campaign_optimisation"
EXPERIMENT = "subject_cta_grid"
ACTION = "campaign_email"
SENSOR_NAME = f"{PLAYBOOK}_sensor"
OUTCOMES_SENSOR_NAME = f"{PLAYBOOK}_outcomes_sensor"
EXECUTION_NODE = f"{PLAYBOOK}_execution"
OUTCOMES_NODE = f"{PLAYBOOK}_outcomes"
DAY_JOB = "campaign_day_job"
TRACKING_JOB = "campaign_tracking_job"
TRACKING_SECRET_ENV = "CAMPAIGN_TRACKING_SECRET"
LEDGER_FILE_NAME = "campaign_ledger.db"
MAILBOX_DIR_NAME = "campaign_mailbox"
RECEIVERS_LOG_NAME = "campaign_receivers.log"
# local_receivers also runs a CRM receiver, which this story does not use; its file goes here.
UNUSED_CRM_DB_NAME = "campaign_receivers_crm.sqlite"
SEND_TIME = dt.time(8, 0)
AUDIENCE_SEED = 7
COLUMN = 8


class SimulatedClock:
    """The story's time: a moment of the simulated calendar, moved forward by the demo.

    Args:
        start: The first moment (aware).
    """

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def move_to(self, when: dt.datetime) -> dt.datetime:
        """Move forward to ``when`` (never back); returns the time it now shows."""
        self.now = max(self.now, when)
        return self.now


@dataclass
class DayLine:
    """What one simulated day did."""

    day: str
    flagged_campaigns: int = 0
    emails: int = 0
    held_out: int = 0
    opens: int = 0
    clicks: int = 0
    status: str = ""
    weights: dict[str, float] | None = None


def _at(day: dt.date, moment: dt.time) -> dt.datetime:
    return dt.datetime.combine(day, moment, dt.UTC)


def _fresh(paths: list[Path]) -> None:
    """Remove an earlier run's record of the story: every run starts a new experiment."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if candidate.is_file():
                candidate.unlink()


def _metadata(run: "dg.ExecuteInProcessResult", asset: str) -> dict[str, Any]:
    for event in run.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in materialization.metadata.items()}
    raise SystemExit(f"run {run.run_id} materialized no {asset}")


def _run_day_job(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    job: str,
    day: str,
    *,
    run_config: Mapping[str, Any],
) -> "dg.ExecuteInProcessResult":
    run = defs.resolve_job_def(job).execute_in_process(
        partition_key=day, instance=instance, run_config=dict(run_config), raise_on_error=False
    )
    if not run.success:
        checks = ", ".join(
            f"{e.check_name} {'passed' if e.passed else 'FAILED'}"
            for e in run.get_asset_check_evaluations()
        )
        raise SystemExit(f"{job} for {day} failed ({checks or 'see the run'}): run {run.run_id}")
    return run


def _answer_sensor(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    home: Path,
    sensor: str,
    *,
    run_config: Mapping[str, Any],
) -> list["dg.ExecuteInProcessResult"]:
    """Evaluate a sensor as the daemon would and execute each run it requests."""
    cursor_file = cursor_path(home, sensor)
    result = tick(defs, instance, sensor, cursor=load_cursor(cursor_file))
    runs = [
        execute_request(defs, instance, sensor, request, config=run_config)
        for request in result.requests
    ]
    store_cursor(cursor_file, result.cursor)
    return runs


def _weights_text(weights: Mapping[str, float], variants: list[str]) -> str:
    return "".join(f"{weights.get(v, 0.0):>{COLUMN}.2f}" for v in variants)


def print_day(index: int, line: DayLine, variants: list[str]) -> None:
    """One row of the daily table: the flagged campaigns, the emails sent and held out, the
    recipients who opened and who clicked that day, the next day's weights and the status."""
    weights = _weights_text(line.weights or {}, variants)
    print(
        f"  {index:>3}  {line.day}  {line.flagged_campaigns:>5}  {line.emails:>6,}  "
        f"{line.held_out:>5,}  {line.opens:>6,}  {line.clicks:>5,}{weights}  {line.status}",
        flush=True,
    )


def print_header(variants: list[str]) -> None:
    """The daily table's header."""
    print()
    print(
        "  weights: in force from the next day on (the experiment's Thompson allocation; equal "
        "until every variant has its minimum sample)"
    )
    print(
        f"  {'day':>3}  {'date':<10}  {'flag':>5}  {'emails':>6}  {'held':>5}  {'opened':>6}  "
        f"{'click':>5}" + "".join(f"{v:>{COLUMN}}" for v in variants) + "  status"
    )


def _percent(value: float) -> str:
    return f"{value:+.1%}"


def print_decision(
    variants: "pd.DataFrame", metadata: Mapping[str, Any], *, truth: Mapping[str, float]
) -> dict[str, Any]:
    """The decision, the true best against the promoted variant, the lifts; returns the figures."""
    from resources.campaign_variants import CONTROL, true_best, true_lift

    winner = str(metadata.get("winner") or "") or None
    best = true_best(truth)
    print()
    when = f" on day {metadata['day']}" if "day" in metadata else ""
    print(f"decision{when}: {metadata.get('decision')}")
    print(f"  true best variant     {best} (true click rate {truth[best]:.2%})")
    if winner is None:
        print("  promoted variant      none yet")
        return {"winner": None, "best": best}
    row = next(r for r in variants.to_dict("records") if r["variant"] == winner)
    estimate = float(row["lift_vs_control"])
    low, high = float(row["lift_vs_control_low"]), float(row["lift_vs_control_high"])
    lift = true_lift(winner, control=CONTROL, rates=truth)
    covered = low <= lift <= high
    print(
        f"  promoted variant      {winner} (true click rate {truth[winner]:.2%}, measured "
        f"{float(row['rate']):.2%} over {int(row['n']):,} recipients)"
    )
    print(
        f"  estimated lift        {_percent(estimate)} vs {CONTROL}, 95% interval "
        f"[{_percent(low)}, {_percent(high)}]"
    )
    print(
        f"  true lift             {_percent(lift)} "
        f"({'inside' if covered else 'OUTSIDE'} the interval)"
    )
    print()
    print(
        f"  {'variant':<9}{'n':>7}{'clicks':>8}{'rate':>8}{'true':>8}{'P(best)':>9}"
        f"{'lift':>9}  status"
    )
    for record in variants.sort_values("variant").to_dict("records"):
        name = str(record["variant"])
        lift_text = _percent(float(record["lift_vs_control"])) if name != CONTROL else "control"
        print(
            f"  {name:<9}{int(record['n']):>7,}{int(record['conversions']):>8,}"
            f"{float(record['rate']):>8.2%}{truth[name]:>8.2%}"
            f"{float(record['probability_best']):>9.3f}{lift_text:>9}  {record['status']}"
        )
    return {
        "winner": winner,
        "best": best,
        "estimated_lift": estimate,
        "lift_low": low,
        "lift_high": high,
        "true_lift": lift,
        "covered": covered,
    }


def _tracking_counts(tracker: "TrackingServer") -> Counter[str]:
    return Counter(tracker.event_counts())


def check_records(
    *,
    ledger: "ActionLedger",
    mailbox_files: int,
    tracker: "TrackingServer",
    audience: "SimulatedAudience",
    reports: list["AudienceReport"],
    figures: Mapping[str, Any],
) -> bool:
    """Compare the mailbox, the tracking endpoint, the audience and the ledger; print each check."""
    actions = ledger.actions(playbook=PLAYBOOK)
    succeeded = actions[actions["state"] == "succeeded"]
    # Each email's Message-ID carries its action's idempotency key: the variant the audience read
    # from the text against the variant the ledger sent it with.
    sent_variant = dict(zip(succeeded["idempotency_key"], succeeded["variant"], strict=True))
    recognised = [r for r in audience.readings if r.variant is not None]
    disagree = sum(
        1
        for r in recognised
        if sent_variant.get(r.message_id.strip("<>").partition("@")[0]) != r.variant
    )
    # After the promotion the winner's emails are the action's, outside the experiment.
    exposures = ledger.exposures_frame(PLAYBOOK, action=ACTION)
    treated = exposures[exposures["arm"] != "holdout"]
    made: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for report in reports:
        made.update(report.requests)
        statuses.update(report.statuses)
    recorded = _tracking_counts(tracker)
    checks = [
        (
            "emails in the mailbox (one per Message-ID)",
            mailbox_files,
            "actions the ledger sent",
            len(succeeded),
        ),
        (
            "emails whose variant the audience read",
            len(recognised),
            "emails in the mailbox",
            mailbox_files,
        ),
        ("variants read unlike the ledger assigned", disagree, "none", 0),
        (
            "treated exposures in the ledger",
            len(treated),
            "actions the ledger sent",
            len(succeeded),
        ),
        (
            "clicks the audience made",
            made["click"],
            "clicks the endpoint recorded",
            recorded["click"],
        ),
        (
            "pixel loads minus repeats within a minute",
            made["open"] - tracker.deduplicated,
            "opens the endpoint recorded",
            recorded["open"],
        ),
        (
            "unsubscribes the audience made",
            made["unsubscribe"],
            "unsubscribes recorded",
            recorded["unsubscribe"],
        ),
        ("tracking requests refused", tracker.refused, "none", 0),
        (
            "promoted variant is the true best",
            int(figures.get("winner") == figures.get("best")),
            "yes",
            1,
        ),
        ("true lift inside the estimate's interval", int(bool(figures.get("covered"))), "yes", 1),
    ]
    print()
    return all([check_line(*check) for check in checks])


def run(start: str = DEFAULT_START, days: int = DEFAULT_DAYS, *, verbose: bool = False) -> int:
    """Run the campaign-optimisation story over ``days`` simulated days from ``start``.

    Args:
        start: The first day (``2026-11-01``); a ``campaign_sends`` partition.
        days: How many days to simulate.
        verbose: Show Dagster's INFO logs.

    Returns:
        The exit code: 0 when the loop ran, promoted the true best variant, and the mailbox, the
        tracking endpoint, the audience and the ledger agree.
    """
    began = time.monotonic()
    home = prepare_dagster_home()
    secret = ensure_secret(TRACKING_SECRET_ENV)
    ensure_crm_secret()
    from demo import PROJECT_DIR
    from demo.stock import ChildProcess

    # resources.channels.var_dir without importing Dagster first (checked against it below), so
    # the sink starts at once and loads while the deployment does.
    configured = os.environ.get("AUTOEXEC_VAR_DIR", "").strip()
    var = Path(configured).absolute() if configured else PROJECT_DIR / "var"
    var.mkdir(parents=True, exist_ok=True)
    mailbox = var / MAILBOX_DIR_NAME
    _fresh([mailbox])
    # Started before the rest of the deployment is imported, so it loads meanwhile.
    receivers = ChildProcess(
        [
            sys.executable,
            "-m",
            "resources.local_receivers",
            "--smtp-port=0",
            "--crm-port=0",
            f"--mailbox={mailbox}",
            f"--crm-db={var / UNUSED_CRM_DB_NAME}",
            f"--owner-pid={os.getpid()}",
        ],
        log_file=var / RECEIVERS_LOG_NAME,
        env=os.environ,
        name="the SMTP sink",
    )
    say("campaigns: loading the deployment (Dagster, the campaign assets, autoexec_dagster)")
    import dagster as dg

    from assets.campaigns import campaign_partitions
    from autoexec_dagster import ActionLedger
    from definitions import build_defs
    from resources.campaign_audience import SimulatedAudience
    from resources.campaign_channels import campaign_channels, tracking_db_path
    from resources.campaign_variants import TRUE_CLICK_RATES
    from resources.channels import var_dir
    from resources.tracking_server import TrackingServer
    from sensors import build_campaign_execution_defs

    first = dt.date.fromisoformat(start)
    calendar = [first + dt.timedelta(days=i) for i in range(days)]
    for day in calendar:
        if not campaign_partitions.has_partition_key(day.isoformat()):
            receivers.stop()
            raise SystemExit(f"{day} is not a campaign_sends partition (from 2026-11-01 on)")
    if var != var_dir():
        receivers.stop()
        raise SystemExit(f"the var folder is {var_dir()}, not {var}: see resources/channels.py")
    ledger_path, tracking_db = var / LEDGER_FILE_NAME, tracking_db_path()
    _fresh([ledger_path, tracking_db])
    clock = SimulatedClock(_at(first, SEND_TIME))
    config = make_run_config(verbose)
    variants = sorted(TRUE_CLICK_RATES)
    lines: list[DayLine] = []
    reports: list[AudienceReport] = []
    with ExitStack() as stack:
        stack.callback(receivers.stop)
        ready = receivers.ready_line()
        smtp_port = int(ready["smtp_port"])
        say(
            f"receivers: SMTP sink, its own process (pid {ready['pid']}) on "
            f"127.0.0.1:{smtp_port} -> {mailbox}"
        )
        tracker = stack.enter_context(
            TrackingServer(secret, tracking_db, clock=clock, simulated_time=True)
        )
        say(
            f"tracking endpoint: {tracker.url} (opens, clicks, unsubscribes; simulated time) "
            f"-> {tracking_db}"
        )
        ledger = ActionLedger(f"sqlite:///{ledger_path}", clock=clock)
        stack.callback(ledger.dispose)
        say(f"ledger: {ledger.display_url} (this story's own, started afresh)")
        say(
            f"clock: simulated, from {clock.now:%Y-%m-%d %H:%M} UTC over {days} "
            f"day{'s' if days != 1 else ''}; the ledger, the tracking endpoint and the audience "
            "read it"
        )
        channels = campaign_channels(smtp_port=smtp_port, tracking_url=tracker.url)
        defs = build_defs(
            campaign_execution=build_campaign_execution_defs(channels=channels, ledger=ledger)
        )
        instance = stack.enter_context(dg.DagsterInstance.get())
        audience = SimulatedAudience(seed=AUDIENCE_SEED)
        print_header(variants)
        last_outcomes: dg.ExecuteInProcessResult | None = None
        promotion: dict[str, Any] = {}
        for index, date in enumerate(calendar, start=1):
            day = date.isoformat()
            line = DayLine(day=day)
            clock.move_to(_at(date, SEND_TIME))
            scored = _run_day_job(defs, instance, DAY_JOB, day, run_config=config)
            line.flagged_campaigns = int(
                _metadata(scored, "campaign_click_insight")["underperforming"]
            )
            _answer_sensor(defs, instance, home, SENSOR_NAME, run_config=config)
            counts = ledger.state_counts(playbook=PLAYBOOK, partition_key=day)
            line.held_out = int(counts.get("held_out", 0))
            # The sink files a message before it answers 250: the run's emails are all there.
            line.emails = len(audience.read_mailbox(mailbox, received_at=clock.now))
            clock.move_to(_at(date + dt.timedelta(days=1), dt.time()))
            report = audience.react(clock.now - dt.timedelta(microseconds=1))
            reports.append(report)
            collected = _run_day_job(defs, instance, TRACKING_JOB, day, run_config=config)
            outcome = _metadata(collected, "campaign_outcomes")
            line.opens, line.clicks = int(outcome["opened"]), int(outcome["clicked"])
            updates = _answer_sensor(defs, instance, home, OUTCOMES_SENSOR_NAME, run_config=config)
            if updates:
                last_outcomes = updates[-1]
                experiment = _metadata(last_outcomes, f"{PLAYBOOK}/experiment")
                line.weights = {v: float(experiment.get(f"weight/{v}", 0.0)) for v in variants}
                line.status = str(experiment["status"])
                if experiment.get("winner"):
                    line.status += f" {experiment['winner']}"
                    promotion = promotion or {"day": index, **experiment}
            lines.append(line)
            print_day(index, line, variants)
        if last_outcomes is None:
            raise SystemExit("the outcomes sensor requested no run: the experiment never updated")
        experiment = _metadata(last_outcomes, f"{PLAYBOOK}/experiment")
        frames = last_outcomes.output_for_node(OUTCOMES_NODE, "experiment")
        figures = print_decision(
            frames[EXPERIMENT], promotion or experiment, truth=TRUE_CLICK_RATES
        )
        learnings = str(last_outcomes.output_for_node(OUTCOMES_NODE, "learnings"))
        print()
        print("learnings (campaign_optimisation/learnings):")
        print()
        print(learnings.strip())
        ok = check_records(
            ledger=ledger,
            mailbox_files=len(list(mailbox.glob("*.eml"))),
            tracker=tracker,
            audience=audience,
            reports=reports,
            figures=figures,
        )
    print()
    say(
        f"campaigns: {days} simulated days in {time.monotonic() - began:.0f} s; look further: "
        f".venv/bin/autoexec summary --ledger sqlite:///{ledger_path}"
    )
    say("done" if ok else "done, but the checks disagree (see above)")
    return 0 if ok else 1


def main() -> int:
    """``python -m demo.campaigns``: the story alone, with its defaults."""
    return run()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
