"""The stock-replenishment story of the demo (``python -m demo stock``), end to end.

1. Open the supplier catalogue and live inventory (``var/suppliers.sqlite``, seeded for the day
   the first time) and start the local destinations: an SMTP sink filing the approvers' emails
   into ``var/mailbox``, the supplier API (``python -m resources.supplier_api``, its own process,
   its record in ``var/supplier_api.sqlite``) and the approval endpoint the emails' links open
   (``autoexec serve``, its own process).
2. Use the Dagster instance at ``$DAGSTER_HOME``: train the demand forecast once, then find one
   day's (``--day``) stock shortages with the execution layer's blocking checks.
3. Evaluate ``stock_replenishment_sensor`` as the daemon would and run the execution job it
   requests: each short SKU starts the ``replenish`` workflow (quotes, the cheapest supplier in
   time, a draft purchase order); orders up to 5,000 go to their supplier at once, larger ones
   wait for procurement, who gets an email with the order and signed approve and reject links.
4. Decide as people do: approve one order with ``autoexec approve`` and one through its email's
   link (a GET shows the confirmation page and decides nothing; the page's POST decides), reject
   one with ``autoexec reject``; the others are left to wait.
5. Let the workflows advance to the end: whenever work is due (a decision, a follow-up, an
   approval's SLA or expiry), the demo moves the clock there and runs what the workflows sensor
   requests. Confirmed orders go on order in the inventory; rejected ones, the silent supplier's
   and those nobody approved go to a person with their history.
6. Print what happened, who approved what, a backtest of two approval thresholds over the days
   before, and check the supplier API's record, the ledger and the inventory against each other.

Time. As in the host story, the ledger and the supplier API read an injected clock
(``var/stock_demo_clock.txt``) that the demo moves to each next due time instead of waiting, so
the playbook runs as it ships (follow-ups every 6 hours, a 2-day approval expiry) and the story
takes a minute. The clock starts at the real time (or where an earlier run left it, if later)
and only moves forward. ``autoexec approve`` and ``autoexec serve`` decide on the real time, which
is never later than the demo's clock, so a decision is due at once.
"""

import contextlib
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from demo import (
    PROJECT_DIR,
    ensure_approval_secret,
    ensure_supplier_secret,
    prepare_dagster_home,
)
from demo.hosts import DemoClock
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
    import pandas as pd

    from autoexec_dagster import ActionLedger
    from resources.local_servers import ReceivedMail
    from resources.supplier_api import SupplierApi

DEFAULT_DAY = "2026-11-10"
PLAYBOOK = "stock_replenishment"
SENSOR_NAME = f"{PLAYBOOK}_sensor"
WORKFLOWS_SENSOR_NAME = f"{PLAYBOOK}_workflows_sensor"
SCORING_JOB = "stock_scoring_job"
EXECUTION_NODE = f"{PLAYBOOK}_execution"
APPROVAL_URL_ENV = "AUTOEXEC_APPROVAL_URL"
APPROVER = "procurement"
CLOCK_FILE_NAME = "stock_demo_clock.txt"
API_LOG_NAME = "supplier_api.log"
SERVE_LOG_NAME = "approval_server.log"
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
ADVANCE_DEADLINE_SECONDS = 300.0
MAX_ADVANCE_RUNS = 40
BACKTEST_DAYS = 7
THRESHOLDS = {"5,000": 5_000, "10,000": 10_000}
# What stands in for the draft's total when no step runs: the estimate the insight carries.
BACKTEST_ASSUME = {"draft_po.total": "reorder_qty * unit_cost"}
WIDTH = 34
CURRENCY = "EUR"


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _money(value: float) -> str:
    return f"{CURRENCY} {value:,.2f}"


def _aware(value: Any) -> dt.datetime:
    import pandas as pd

    stamp = pd.Timestamp(value)
    return (stamp.tz_localize(dt.UTC) if stamp.tzinfo is None else stamp).to_pydatetime()


def _offset_text(seconds: float) -> str:
    """A clock offset for people: +0:05, +6:00, +1d 0:00."""
    minutes = round(seconds / 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return f"+{days}d {hours}:{minutes:02d}" if days else f"+{hours}:{minutes:02d}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _short_links(text: str) -> str:
    """A text with each link's token cut short: enough to recognise it, not to use it."""
    return re.sub(r"(token=[A-Za-z0-9_-]{12})[A-Za-z0-9_.-]+", r"\1...", text)


# -- the local destinations --------------------------------------------------------------------


class ChildProcess:
    """A local destination as its own process of the project, stopped with the demo.

    Args:
        command: Its command line (arguments never carry secrets: they are visible to every
            user of the machine; secrets travel in the inherited environment).
        log_file: Where its stderr goes (appended).
        env: Its environment.
        name: What to call it in messages.
    """

    def __init__(
        self, command: list[str], *, log_file: Path, env: Mapping[str, str], name: str
    ) -> None:
        self.name = name
        self.log_file = log_file
        with log_file.open("a") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=PROJECT_DIR,
                text=True,
                stdout=subprocess.PIPE,
                stderr=log,
                env=dict(env),
            )

    def ready_line(self) -> dict[str, Any]:
        """The JSON line it prints once it listens.

        Raises:
            SystemExit: It exited or printed nothing before the deadline.
        """
        from demo.ui import read_ready_line

        try:
            return read_ready_line(self.proc, STARTUP_TIMEOUT_SECONDS, name=self.name)
        except RuntimeError as exc:
            raise SystemExit(f"{exc} (its log: {self.log_file})") from None

    def wait_for_health(self, url: str) -> None:
        """Poll ``url`` until it answers 200.

        Raises:
            SystemExit: The process exited or did not answer before the deadline.
        """
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.name} exited with code {self.proc.returncode} (its log: "
                    f"{self.log_file})"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not answer within {STARTUP_TIMEOUT_SECONDS:.0f} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_supplier_api(*, db: Path, catalogue: Path, clock_file: Path, var: Path) -> ChildProcess:
    """``python -m resources.supplier_api`` on a free port, on the demo's clock."""
    command = [
        sys.executable,
        "-m",
        "resources.supplier_api",
        "--port=0",
        f"--db={db}",
        f"--catalogue={catalogue}",
        f"--clock-file={clock_file}",
        f"--owner-pid={os.getpid()}",
    ]
    return ChildProcess(
        command, log_file=var / API_LOG_NAME, env=os.environ, name="the supplier API"
    )


def start_approval_server(*, port: int, ledger_url: str, var: Path) -> ChildProcess:
    """``autoexec serve`` on ``port``: the endpoint the emails' signed links open."""
    command = [
        str(Path(sys.executable).parent / "autoexec"),
        "serve",
        "--ledger",
        ledger_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return ChildProcess(
        command, log_file=var / SERVE_LOG_NAME, env=os.environ, name="the approval endpoint"
    )


def autoexec(*args: str, ledger_url: str) -> tuple[int, str]:
    """Run the ``autoexec`` command line as a person would; returns its status and output."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "autoexec"), *args],
        cwd=PROJECT_DIR,
        env={**os.environ, "AUTOEXEC_LEDGER_URL": ledger_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, (result.stdout + result.stderr).strip()


def http(method: str, url: str, form: Mapping[str, str] | None = None) -> tuple[int, str]:
    """One HTTP request as a browser makes it; returns the status and the page's text."""
    data = None if form is None else urllib.parse.urlencode(dict(form)).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def page_title(page: str) -> str:
    """The page's first heading, for the demo's line."""
    found = re.search(r"<h1>(.*?)</h1>", page, re.DOTALL)
    return re.sub(r"<[^>]+>", "", found.group(1)).strip() if found else "?"


# -- Dagster -------------------------------------------------------------------------------------


def train(instance: "dg.DagsterInstance", *, run_config: Mapping[str, Any]) -> None:
    """Materialize the sales history and the demand forecast unless trained before.

    Raises:
        SystemExit: The training run failed.
    """
    from assets import demand_forecast_model, sales_history, stock_assets

    metadata = train_once(
        instance,
        assets=stock_assets,
        selection=[sales_history, demand_forecast_model],
        model=demand_forecast_model,
        announce="training: a year of daily sales of 500 SKUs; a gradient-boosted demand forecast",
        run_config=run_config,
    )
    if metadata is not None:
        say(
            f"training: demand_forecast_model WAPE {metadata['wape']:.3f} over each SKU's lead "
            f"time, against {metadata['baseline_wape']:.3f} for seasonal naive"
        )


def score(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    day: str,
    *,
    run_config: Mapping[str, Any],
) -> dict[str, Any]:
    """Materialize one stock_shortages partition with its checks (the scoring job).

    Returns:
        The materialization's metadata values.

    Raises:
        SystemExit: The scoring run or a blocking check failed.
    """
    from assets import stock_shortages

    again = day in instance.get_materialized_partitions(stock_shortages.key)
    say(
        f"scoring: {day}, every SKU's stock against its forecast demand over the lead time"
        + (" (scored before: the same model output arrives again)" if again else "")
    )
    result = defs.resolve_job_def(SCORING_JOB).execute_in_process(
        partition_key=day, instance=instance, run_config=run_config, raise_on_error=False
    )
    checks = ", ".join(
        f"{e.check_name} {'passed' if e.passed else 'FAILED'}"
        for e in result.get_asset_check_evaluations()
    )
    if not result.success:
        raise SystemExit(f"scoring {day} failed ({checks}): see run {result.run_id}")
    metadata: dict[str, Any] = {
        k: v.value
        for k, v in result.asset_materializations_for_node("stock_shortages")[0].metadata.items()
    }
    say(
        f"scoring: {metadata['dagster/row_count']:,} SKUs, {metadata['flagged']:,} short "
        f"(estimated orders {_money(float(metadata['estimated_order_value']))}); checks: {checks}"
    )
    return metadata


def _flow_text(report: Mapping[str, Any]) -> str:
    flow: Mapping[str, Any] = report.get("workflows") or {}
    if not flow:
        return "no workflow work"
    steps: Mapping[str, Mapping[str, int]] = flow.get("by_step") or {}

    def n(step: str, outcome: str) -> int:
        return int((steps.get(step) or {}).get(outcome, 0))

    parts = []
    for count, one, many in (
        (n("draft_po", "delivered"), "drafted", "drafted"),
        (n("approval", "approved_by_rule"), "approved by the rule", "approved by the rule"),
        (n("approval", "requested"), "waiting for approval", "waiting for approval"),
        (n("approval", "approved"), "approved by people", "approved by people"),
        (int(flow.get("rejected", 0)), "rejected by people", "rejected by people"),
        (n("submit", "delivered"), "submitted", "submitted"),
        (n("confirm", "delivered"), "follow-up", "follow-ups"),
        (n("inventory", "delivered"), "on order in the inventory", "on order in the inventory"),
        (int(flow.get("expired", 0)), "expired", "expired"),
        (int(flow.get("escalated", 0)), "escalated", "escalated"),
    ):
        if count:
            parts.append(f"{count:,} {one if count == 1 else many}")
    if flow.get("waiting"):
        parts.append(f"{int(flow['waiting']):,} waiting")
    return ", ".join(parts) or "nothing to do"


def execute_new_days(
    defs: "dg.Definitions",
    instance: "dg.DagsterInstance",
    home: Path,
    *,
    run_config: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Evaluate the execution sensor as the daemon would and execute each run it requests.

    Returns:
        The execution report of each run.
    """
    cursor_file = cursor_path(home, SENSOR_NAME)
    result = tick(defs, instance, SENSOR_NAME, cursor=load_cursor(cursor_file))
    if not result.requests:
        say(f"sensor: no run requested ({result.skip_reason or 'nothing new'})")
    reports = []
    for request in result.requests:
        say(
            f"executing: {PLAYBOOK} on stock_shortages {request.partition_key}, as "
            f"{SENSOR_NAME} requested (run key {request.run_key})"
        )
        began = time.monotonic()
        run = execute_request(defs, instance, SENSOR_NAME, request, config=run_config)
        report = run.output_for_node(EXECUTION_NODE, "actions")
        say(
            f"executing: run {run.run_id[:8]} finished in {time.monotonic() - began:.1f} s: "
            f"{int(report.get('workflows_started', 0)):,} workflows started; "
            f"{_flow_text(report)}"
        )
        reports.append(report)
    store_cursor(cursor_file, result.cursor)
    return reports


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

    Returns:
        The execution report of each advance run.

    Raises:
        SystemExit: A run failed, or work is still due after the deadline.
    """
    cursor_file = cursor_path(home, WORKFLOWS_SENSOR_NAME)
    cursor = load_cursor(cursor_file)
    deadline = time.monotonic() + ADVANCE_DEADLINE_SECONDS
    reports: list[dict[str, Any]] = []
    while (due := ledger.next_due(playbook=PLAYBOOK)) is not None:
        if time.monotonic() > deadline or len(reports) >= MAX_ADVANCE_RUNS:
            raise SystemExit(
                f"workflows still due after {len(reports)} advance runs; see "
                f"`.venv/bin/autoexec workflows --playbook {PLAYBOOK}`"
            )
        now = clock.move_to(_aware(due))
        result = tick(defs, instance, WORKFLOWS_SENSOR_NAME, cursor=cursor)
        cursor = result.cursor
        if not result.requests:
            raise SystemExit(
                f"work is due at {now:%Y-%m-%d %H:%M:%S} but {WORKFLOWS_SENSOR_NAME} requested "
                f"no run ({result.skip_reason}); see `.venv/bin/autoexec workflows --playbook "
                f"{PLAYBOOK}`"
            )
        for request in result.requests:
            run = execute_request(defs, instance, WORKFLOWS_SENSOR_NAME, request, config=run_config)
            report = run.output_for_node(EXECUTION_NODE, "actions")
            reports.append(report)
            sla = [
                e
                for e in run.get_asset_check_evaluations()
                if e.check_name == f"{PLAYBOOK}_approval_sla" and not e.passed
            ]
            warned = "; the approval SLA check warns: waited past 1 day" if sla else ""
            say(
                f"advancing: clock {_offset_text((now - start).total_seconds())}, run "
                f"{run.run_id[:8]} ({request.partition_key}): {_flow_text(report)}{warned}"
            )
    store_cursor(cursor_file, cursor)
    return reports


# -- people deciding ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One pending approval request as the demo shows it."""

    approval_id: str
    sku: str
    value: float
    po_id: str
    product: str
    supplier: str


def pending_requests(ledger: "ActionLedger", day: str) -> list[Request]:
    """The day's pending approval requests, largest first."""
    frame = ledger.pending_approvals(playbook=PLAYBOOK, partition_key=day, with_payload=True)
    found = []
    for row in frame.to_dict("records"):
        payload = json.loads(str(row["payload"]))
        found.append(
            Request(
                approval_id=str(row["approval_id"]),
                sku=str(row["entity_id"]),
                value=float(row["value"]),
                po_id=str(payload.get("draft_po.po_id")),
                product=str(payload.get("product")),
                supplier=str(payload.get("draft_po.supplier_id")),
            )
        )
    return sorted(found, key=lambda r: -r.value)


def email_of(messages: Sequence["ReceivedMail"], approval_id: str) -> "ReceivedMail | None":
    """The approver's email about one request, from what the SMTP sink received."""
    from email.message import EmailMessage

    for mail in messages:
        message = mail.message
        if isinstance(message, EmailMessage) and approval_id in str(message.get_content()):
            return mail
    return None


def _body(mail: "ReceivedMail") -> str:
    from email.message import EmailMessage

    message = mail.message
    return str(message.get_content()) if isinstance(message, EmailMessage) else ""


def show_email(mail: "ReceivedMail") -> None:
    """Print an email as its reader sees it (the links' tokens cut short)."""
    message = mail.message
    print()
    print(f"  From:    {message['From']}")
    print(f"  To:      {message['To']}")
    print(f"  Subject: {message['Subject']}")
    print()
    for line in _short_links(_body(mail).replace("\r\n", "\n")).rstrip().splitlines():
        print(f"  | {line}".rstrip())
    print()


def decide(ledger: "ActionLedger", day: str, messages: Sequence["ReceivedMail"]) -> None:
    """Approve one order from the command line and one through its email's link; reject one.

    The largest waiting order is rejected, the next one approved with ``autoexec approve`` and
    the third through the signed link of its email; any others are left to wait (and expire).
    """
    waiting = pending_requests(ledger, day)
    if not waiting:
        say("deciding: no approval request is waiting for a person")
        return
    url = ledger.display_url
    status, listing = autoexec(
        "approvals", "--playbook", PLAYBOOK, "--partition", day, ledger_url=url
    )
    say(f"deciding: {len(waiting)} orders wait for {APPROVER}; `autoexec approvals` shows them:")
    for line in listing.splitlines():
        print(f"    {line}")
    if status != 0:
        raise SystemExit(f"autoexec approvals failed ({status})")
    rejected, by_cli, by_link = [*waiting, None, None, None][:3]

    if rejected is not None:
        note = "too large for one order: split it over two deliveries"
        status, output = autoexec(
            "reject",
            rejected.approval_id[:12],
            "--by",
            APPROVER,
            "--note",
            note,
            ledger_url=url,
        )
        say(
            f"deciding: $ autoexec reject {rejected.approval_id[:12]} --by {APPROVER} --note "
            f'"{note}"'
        )
        for line in output.splitlines():
            print(f"    {line}")
        if status != 0:
            raise SystemExit(f"autoexec reject failed ({status})")
    if by_cli is not None:
        note = "checked against the promotion plan"
        status, output = autoexec(
            "approve", by_cli.approval_id[:12], "--by", APPROVER, "--note", note, ledger_url=url
        )
        say(
            f"deciding: $ autoexec approve {by_cli.approval_id[:12]} --by {APPROVER} --note "
            f'"{note}"'
        )
        for line in output.splitlines():
            print(f"    {line}")
        if status != 0:
            raise SystemExit(f"autoexec approve failed ({status})")
    if by_link is not None:
        mail = email_of(messages, by_link.approval_id)
        if mail is None:
            raise SystemExit(f"no email about {by_link.po_id} reached the SMTP sink")
        say(f"deciding: {APPROVER}'s email about {by_link.po_id}, as the SMTP sink received it:")
        show_email(mail)
        found = re.search(r"Approve:\s+(http\S+)", _body(mail))
        if found is None:
            raise SystemExit(f"the email about {by_link.po_id} carries no approve link")
        link = found.group(1)
        status, page = http("GET", link)
        still = ledger.approval_rows([by_link.approval_id])[by_link.approval_id]["status"]
        say(
            f'deciding: GET {_short_links(link)} -> {status}: "{page_title(page)}" '
            f"(a confirmation page; the request is still {still})"
        )
        path, _, token = link.partition("?token=")
        status, page = http("POST", path, {"token": token, "note": "ok, approved from the email"})
        still = ledger.approval_rows([by_link.approval_id])[by_link.approval_id]["status"]
        say(
            f"deciding: POST {_short_links(path)} (the page's button) -> {status}: "
            f'"{page_title(page)}" (the request is now {still})'
        )
        if still != "approved":
            raise SystemExit(f"the link did not approve {by_link.po_id}: {page_title(page)}")
    left = len(waiting) - sum(r is not None for r in (rejected, by_cli, by_link))
    if left:
        say(
            f"deciding: {left} more left waiting: unanswered, they expire after {_expiry_text()} "
            "and go to a person"
        )


# -- what happened -----------------------------------------------------------------------------


@dataclass
class Order:
    """One short SKU's workflow, as the ledger records it."""

    sku: str
    state: str
    outputs: dict[str, Any]
    log: list[dict[str, Any]]
    error: str | None

    @property
    def draft(self) -> dict[str, Any]:
        return self.outputs.get("draft_po") or {}

    @property
    def value(self) -> float:
        return float(self.draft.get("total") or 0.0)

    @property
    def failed_step(self) -> str | None:
        failures = [e["step"] for e in self.log if e.get("outcome") == "failed"]
        return failures[-1] if failures else None


@dataclass
class StockOutcome:
    """One day's replenishment as the ledger records it, whichever runs did the work."""

    day: str
    flagged: int = 0
    orders: dict[str, Order] = field(default_factory=dict)
    approvals: list[dict[str, Any]] = field(default_factory=list)
    escalations: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_ledger(cls, ledger: "ActionLedger", day: str) -> "StockOutcome":
        totals = ledger.partition_outcome(playbook=PLAYBOOK, partition_key=day)
        outcome = cls(day, flagged=totals.flagged)
        for row in _records(ledger.instances(playbook=PLAYBOOK, partition_key=day)):
            outcome.orders[str(row["entity_id"])] = Order(
                sku=str(row["entity_id"]),
                state=str(row["state"]),
                outputs=json.loads(str(row["outputs"] or "{}")),
                log=json.loads(str(row["log"] or "[]")),
                error=None if row["error"] is None else str(row["error"]),
            )
        outcome.approvals = _records(ledger.approvals(playbook=PLAYBOOK, partition_key=day))
        queue = ledger.escalations(playbook=PLAYBOOK, partition_key=day, status=None)
        outcome.escalations = {str(r["entity_id"]): r for r in _records(queue)}
        return outcome

    def where(self, *, state: str, step: str | None = None) -> list[Order]:
        return [
            o
            for o in self.orders.values()
            if o.state == state and (step is None or o.failed_step == step)
        ]

    def approvals_by(self, status: str, *, people: bool | None = None) -> list[dict[str, Any]]:
        return [
            a
            for a in self.approvals
            if a["status"] == status and (people is None or (a["decided_by"] != "rule") == people)
        ]


def _records(frame: "pd.DataFrame") -> list[dict[str, Any]]:
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def _value(rows: Sequence[Mapping[str, Any]]) -> float:
    return float(sum(float(r.get("value") or 0.0) for r in rows))


def _orders_value(orders: Sequence[Order]) -> float:
    return float(sum(o.value for o in orders))


def _supplier_of(order: Order) -> str:
    return str(
        order.draft.get("supplier_name")
        or (order.outputs.get("choose") or {}).get("supplier_name")
        or "?"
    )


def print_summary(
    outcome: StockOutcome,
    *,
    scored: Mapping[str, Any],
    reports: Sequence[Mapping[str, Any]],
    inventory_units: int,
) -> None:
    """Print the day's outcome, who decided what, and the person's queue."""
    print()
    print(f"Stock replenishment for {outcome.day}")
    started = sum(int(r.get("workflows_started", 0)) for r in reports)
    steps = sum(int((r.get("workflows") or {}).get("steps_delivered", 0)) for r in reports)
    if started or steps:
        print(
            f"  this run: {started:,} workflows started, {steps:,} steps sent (catalogue, supplier "
            f"API, inventory, approvers) in {len(reports)} runs"
        )
    else:
        print(
            f"  this run: 0 steps sent: all {outcome.flagged:,} short SKUs were handled in an "
            "earlier run, nothing was sent twice"
        )
    drafted = [o for o in outcome.orders.values() if o.draft]
    by_rule = outcome.approvals_by("approved", people=False)
    by_people = outcome.approvals_by("approved", people=True)
    rejected_people = outcome.approvals_by("rejected")
    expired = outcome.approvals_by("expired")
    pending = outcome.approvals_by("pending")
    confirmed = outcome.where(state="succeeded")
    supplier_rejected = outcome.where(state="failed", step="confirmed")
    silent = outcome.where(state="failed", step="submit")
    no_supplier = outcome.where(state="failed", step="choose")
    submitted = [o for o in outcome.orders.values() if "submit" in o.outputs]
    line = lambda *a, **k: print(count_line(*a, width=WIDTH, **k))  # noqa: E731

    line("SKUs checked", int(scored.get("dagster/row_count", 0)))
    line("short of stock", outcome.flagged, "forecast over the lead time > on hand + on order")
    line("no supplier can deliver in time", len(no_supplier), "escalated at once")
    line("purchase orders drafted", len(drafted), _money(_orders_value(drafted)))
    line("  approved automatically", len(by_rule), f"{_money(_value(by_rule))}  (total <= 5,000)")
    line(
        "  waited for procurement",
        len(drafted) - len(by_rule),
        _money(_orders_value(drafted) - _value(by_rule)),
    )
    line("    approved by people", len(by_people), _money(_value(by_people)))
    line("    rejected by people", len(rejected_people), _money(_value(rejected_people)))
    line("    expired, escalated", len(expired), _money(_value(expired)))
    if pending:
        line("    still waiting", len(pending), _money(_value(pending)))
    line("submitted to suppliers", len(submitted))
    line(
        "  confirmed, on order",
        len(confirmed),
        f"{_money(_orders_value(confirmed))}; {inventory_units:,} units added to on_order",
    )
    line("  rejected by the supplier", len(supplier_rejected), "escalated with the reason")
    line("  supplier never answered", len(silent), "submission timed out; escalated")
    others = [o for o in outcome.orders.values() if o.state in ("running", "waiting")]
    if others:
        line("still in progress", len(others), "(run the demo again)")
    autonomous = {str(a["entity_id"]) for a in by_rule} & {o.sku for o in confirmed}
    rate = len(autonomous) / outcome.flagged if outcome.flagged else 0.0
    line("completed without a person", len(autonomous), f"{rate:.0%} of the short SKUs")

    decided = [a for a in outcome.approvals if a["decided_by"] not in (None, "rule")]
    if decided:
        print()
        print("Who decided what (the ledger's approval requests):")
        for a in sorted(decided, key=lambda r: str(r["decided_at"])):
            order = outcome.orders.get(str(a["entity_id"]))
            po = order.draft.get("po_id", "?") if order else "?"
            via = a["decided_via"] or "-"
            note = f'  "{a["decision_note"]}"' if a["decision_note"] else ""
            if a["status"] == "expired":
                note = f"  nobody decided within {_expiry_text()}: escalated"
            print(
                f"  {a['status']:<9} {a['decided_by']!s:<20} via {via:<6} {po}  "
                f"{a['entity_id']}  {_money(float(a['value'] or 0.0))}{note}"
            )
    if outcome.escalations:
        print()
        print("For a person (autoexec escalations), each with the order's history:")
        for sku, case in sorted(outcome.escalations.items()):
            order = outcome.orders.get(sku)
            print(f"  {sku}  {_case_text(order, case)}")


def _expiry_text() -> str:
    """How long an approval request waits, as the playbook says (``2 days``)."""
    from autoexec_dagster import Playbook
    from resources.stock_channels import STOCK_PLAYBOOK_PATH

    gate = Playbook.from_yaml(STOCK_PLAYBOOK_PATH).workflows["replenish"].step("approval")
    hours = round(gate.approval_expiry.total_seconds() / 3600)
    return f"{hours // 24} days" if hours % 24 == 0 else f"{hours} hours"


def _case_text(order: Order | None, case: Mapping[str, Any]) -> str:
    """What a person reads first about an escalated order, from its evidence."""
    reason = str(case["reason"]).removeprefix("Purchase order not completed: ")
    if order is None:
        return reason
    step = order.failed_step
    po = order.draft.get("po_id")
    what = f"{po} {_money(order.value)} from {_supplier_of(order)}" if po else ""
    if step == "choose":
        # "no supplier can deliver N units within D days: <each offer and why not>"
        head, _, offers = reason.removeprefix("step 'choose': ").partition(": ")
        return f"{head} ({offers.count(';') + 1} offers, each too slow or short)"
    if step == "submit":
        attempts = re.search(r"after (\d+) attempt", reason)
        times = f"{attempts.group(1)} attempts" if attempts else "the submission"
        cause = reason.rsplit(": ", 1)[-1]
        return (
            f"{what}: the supplier never answered ({times}, each {cause}); still a draft at the "
            "supplier API"
        )
    if step == "confirmed":
        said = (order.outputs.get("confirm") or {}).get("reason") or reason
        return f"{what}: rejected, {said}"
    if step == "approval":
        return (
            f"{what}: nobody decided within {_expiry_text()} (approvers: {APPROVER}); never "
            "submitted"
        )
    return f"{what}: {reason}" if what else reason


def print_backtest(day: str, model: Any) -> None:
    """The approval threshold at 5,000 and 10,000 over the days before ``day``, from the
    insight alone (nothing is sent)."""
    from assets import find_shortages
    from autoexec_dagster import Playbook
    from autoexec_dagster.backtest import backtest
    from resources.stock_channels import STOCK_PLAYBOOK_PATH

    first = dt.date.fromisoformat(day) - dt.timedelta(days=BACKTEST_DAYS)
    days = [first + dt.timedelta(days=d) for d in range(BACKTEST_DAYS)]
    from assets.stock import FIRST_DAY

    days = [d for d in days if d >= FIRST_DAY]
    if not days:
        return
    playbook = Playbook.from_yaml(STOCK_PLAYBOOK_PATH)
    labels = list(THRESHOLDS)
    report = backtest(
        playbook=playbook,
        insights={d.isoformat(): find_shortages(model, d) for d in days},
        assume=BACKTEST_ASSUME,
        scenarios={labels[1]: {"approval": f"`draft_po.total` > {THRESHOLDS[labels[1]]}"}},
    )
    table = report.side_by_side()
    names = ["as_written", labels[1]]
    print()
    print(
        f"Backtest of the approval threshold, {days[0]} .. {days[-1]} (no side effect; "
        "draft_po.total taken as reorder_qty * unit_cost):"
    )
    header = f"  {'day':<11}{'short':>6}"
    for label in labels:
        header += f"  {'to approve @' + label:>18}{'value':>14}"
    print(header)
    for row in _records(table):
        text = f"  {row['partition']:<11}{int(row['flagged']):>6}"
        for name in names:
            text += (
                f"  {int(row[f'approvals_needed[{name}]']):>18}"
                f"{float(row[f'approvals_value[{name}]']):>14,.0f}"
            )
        print(text)
    totals = {str(r["scenario"]): r for r in _records(report.totals)}
    text = f"  {'total':<11}{int(totals['as_written']['flagged']):>6}"
    for name in names:
        text += (
            f"  {int(totals[name]['approvals_needed']):>18}"
            f"{float(totals[name]['approvals_value']):>14,.0f}"
        )
    print(text)
    rates = ", ".join(
        f"{float(totals[n]['autonomy_rate']):.1%} at {label}"
        for n, label in zip(names, labels, strict=True)
    )
    print(f"  short SKUs whose order needs no approval: {rates}")


# -- the records against each other -------------------------------------------------------------

# Outcomes of the supplier API's `calls` table that executed a request (a replay only repeats
# the recorded answer; a held request was never answered).
EXECUTED = ("created", "existing", "submitted", "answered")


def load_model(defs: "dg.Definitions", instance: "dg.DagsterInstance") -> Any:
    """The trained demand forecast, as the stock_shortages asset loads it."""
    import io

    # Loading outside a run logs the IO manager's DEBUG line on the console, whatever the
    # demo's run config says; the demo prints its own lines.
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        return defs.load_asset_value("demand_forecast_model", instance=instance)


def print_look_further(
    outcome: "StockOutcome", *, ledger_url: str, api_db: Path, catalogue: Path
) -> None:
    """Where a person looks next."""
    from resources.channels import mailbox_dir

    print()
    print("Look further:")
    env = "" if ledger_url == project_ledger_url() else f"AUTOEXEC_LEDGER_URL={ledger_url} "
    print(f"  {env}.venv/bin/autoexec approvals --playbook {PLAYBOOK} --status all")
    print(f"  {env}.venv/bin/autoexec escalations --playbook {PLAYBOOK}")
    example = next(iter(sorted(outcome.escalations)), None)
    if example:
        print(f"  {env}.venv/bin/autoexec history {example}    # every step, output, escalation")
    print(f"  sqlite3 {api_db} 'SELECT status, count(*) FROM purchase_orders GROUP BY status'")
    print(f"  sqlite3 {catalogue} 'SELECT * FROM inventory_orders'")
    print(f"  ls {mailbox_dir()}    # the approvers' emails")
    print("  make ui    # the asset graph, the stock_replenishment/approvals queue, run history")


@dataclass(frozen=True)
class RunMarks:
    """What the supplier API and the ledger held for the day before this demo run."""

    executed: int
    completed: int

    @classmethod
    def take(cls, api: "SupplierApi", ledger: "ActionLedger", day: str) -> "RunMarks":
        keys = _api_step_keys(ledger, day)
        return cls(executed=len(_executed(api, day)), completed=len(keys))


def _api_step_keys(ledger: "ActionLedger", day: str) -> set[str]:
    """The day's step attempts against the supplier API that the ledger completed."""
    steps = ledger.actions(playbook=PLAYBOOK, states=["succeeded"])
    steps = steps[
        (steps["partition_key"] == day)
        & steps["action"].isin(["draft_po", "submit_po", "po_status"])
    ]
    return set(steps["idempotency_key"].astype(str))


def _executed(api: "SupplierApi", day: str) -> Counter[str]:
    """How often the API executed each key of the day's orders (replays and holds aside)."""
    prefix = f"{day}:"
    orders = {
        str(o["po_id"])
        for o in api.purchase_orders()
        if str(o["client_reference"]).startswith(prefix)
    }
    return Counter(
        str(c["idempotency_key"])
        for c in api.calls()
        if c["outcome"] in EXECUTED and str(c["po_id"]) in orders
    )


def check_records(
    outcome: StockOutcome,
    *,
    api: "SupplierApi",
    ledger: "ActionLedger",
    applied: "pd.DataFrame",
    mail_sent: int,
    mail_received: int,
    at: dt.datetime,
    before: RunMarks,
) -> bool:
    """Compare the supplier API's record, the ledger and the inventory for the day.

    Args:
        outcome: The day's outcome from the ledger.
        api: The supplier API's record (read from its database).
        ledger: The action ledger.
        applied: The purchase orders the catalogue applied to the inventory.
        mail_sent: Approver notifications the ledger delivered in this demo run.
        mail_received: Messages the SMTP sink accepted in this demo run.
        at: The demo clock's time (the API shows each order's status then).
        before: What the API and the ledger held for the day before this run.

    Returns:
        True when every comparison holds; each is printed.
    """
    prefix = f"{outcome.day}:"
    orders = {
        str(o["po_id"]): o
        for o in api.purchase_orders(at)
        if str(o["client_reference"]).startswith(prefix)
    }
    drafted = {str(o.draft["po_id"]) for o in outcome.orders.values() if o.draft}
    succeeded = {str(o.draft["po_id"]) for o in outcome.where(state="succeeded")}
    by_supplier = {str(o.draft["po_id"]) for o in outcome.where(state="failed", step="confirmed")}
    submitted = {str(o.draft["po_id"]) for o in outcome.orders.values() if "submit" in o.outputs}
    api_submitted = {p for p, o in orders.items() if o["submitted_at"] is not None}
    api_confirmed = {p for p, o in orders.items() if o["status"] == "confirmed"}
    api_rejected = {p for p, o in orders.items() if o["status"] == "rejected"}
    mine = applied[applied["po_id"].isin(list(orders))]
    applied_units = int(mine["quantity"].sum()) if len(mine) else 0
    confirmed_units = sum(int(orders[p]["quantity"]) for p in api_confirmed)
    # Every API step the ledger completed, by key, against the keys the API executed.
    ledger_keys = _api_step_keys(ledger, outcome.day)
    executed = _executed(api, outcome.day)
    requested = [a for a in outcome.approvals if a["status"] != "void"]
    requested_value = round(_value(requested), 2)
    drafts_value = round(sum(float(orders[p]["total"]) for p in drafted if p in orders), 2)
    print()
    checks = [
        (
            "steps the supplier API executed in this run",
            len(executed) - before.executed,
            "API steps the ledger completed in this run",
            len(ledger_keys) - before.completed,
        ),
        (
            "purchase orders at the supplier API",
            len(orders),
            "orders the ledger drafted",
            len(drafted),
        ),
        ("order ids in only one of the two records", len(set(orders) ^ drafted), "none", 0),
        (
            "orders submitted, per the API",
            len(api_submitted),
            "submit steps that succeeded",
            len(submitted),
        ),
        (
            "orders confirmed, per the API",
            len(api_confirmed),
            "workflows that succeeded",
            len(succeeded),
        ),
        (
            "orders rejected, per the API",
            len(api_rejected),
            "escalated: rejected by the supplier",
            len(by_supplier),
        ),
        (
            "orders the inventory put on order",
            len(mine),
            "orders confirmed, per the API",
            len(api_confirmed),
        ),
        (
            "units the inventory put on order",
            applied_units,
            "units the API confirmed",
            confirmed_units,
        ),
        (
            "step keys the API executed",
            len(executed),
            "API steps the ledger completed",
            len(ledger_keys),
        ),
        ("keys in only one of the two records", len(set(executed) ^ ledger_keys), "none", 0),
        (
            "keys the API executed more than once",
            sum(1 for n in executed.values() if n > 1),
            "none",
            0,
        ),
        (
            "value the approval requests cover (cents)",
            round(requested_value * 100),
            "the drafts' totals at the API (cents)",
            round(drafts_value * 100),
        ),
        (
            "approver emails received in this run",
            mail_received,
            "notifications the ledger sent now",
            mail_sent,
        ),
    ]
    return all([check_line(*check) for check in checks])


def run(day: str, *, verbose: bool = False) -> int:
    """Run the stock story for one stock_shortages partition.

    Args:
        day: The day to score and act on (``2026-11-10``).
        verbose: Show Dagster's INFO logs.

    Returns:
        The exit code: 0 when everything ran and the supplier API's record, the ledger and the
        inventory agree.
    """
    home = prepare_dagster_home()
    secret = ensure_supplier_secret()
    approval_secret = ensure_approval_secret()
    say("stock: loading the deployment (Dagster, scikit-learn, the stock assets, autoexec_dagster)")
    from autoexec_dagster import ActionLedger, ApprovalLinks
    from resources.channels import default_ledger_url, mailbox_dir, var_dir
    from resources.stock_channels import catalogue_path, supplier_api_db_path

    var = var_dir()
    var.mkdir(parents=True, exist_ok=True)
    api_db, ledger_url, catalogue_db = (
        supplier_api_db_path(),
        default_ledger_url(),
        catalogue_path(),
    )
    clock = DemoClock(var / CLOCK_FILE_NAME)
    start = clock.start()
    port = _free_port()
    approval_url = f"http://127.0.0.1:{port}"
    os.environ[APPROVAL_URL_ENV] = approval_url
    with ExitStack() as stack:
        # Both started before the rest of the deployment is imported, so they load meanwhile.
        # The API creates the catalogue if there is none (and reads it once, as it starts).
        api_process = start_supplier_api(
            db=api_db, catalogue=catalogue_db, clock_file=clock.path, var=var
        )
        stack.callback(api_process.stop)
        # The endpoint opens an existing ledger only: open it here first.
        ledger = ActionLedger(ledger_url, clock=clock.read)
        stack.callback(ledger.dispose)
        serve = start_approval_server(port=port, ledger_url=ledger_url, var=var)
        stack.callback(serve.stop)

        import dagster as dg

        from assets import generate_inventory, stock_partitions
        from definitions import build_defs
        from resources.local_servers import SmtpSink
        from resources.stock_channels import stock_channels
        from resources.supplier_api import SupplierApi
        from resources.suppliers import SupplierCatalogue
        from sensors import build_stock_replenishment_execution_defs

        if not stock_partitions.has_partition_key(day):
            keys = stock_partitions.get_partition_keys()
            span = f"{keys[0]} to {keys[-1]}" if keys else "none yet"
            raise SystemExit(f"{day} is not a stock_shortages partition (valid: {span})")
        config = make_run_config(verbose)
        sink = stack.enter_context(SmtpSink(mailbox_dir()))
        say(f"receivers: SMTP sink on 127.0.0.1:{sink.port} -> {mailbox_dir()}")
        ready = api_process.ready_line()
        catalogue = SupplierCatalogue(catalogue_db)
        if catalogue.applied_orders().empty:
            # A fresh inventory starts from the day's stock; once orders were applied to it, it
            # is the live inventory the workflows keep, and later runs leave it as it is.
            catalogue.seed_inventory(generate_inventory(dt.date.fromisoformat(day)), at=start)
        say(
            f"supplier API: its own process (pid {ready['pid']}) on {ready['url']} -> {api_db}; "
            f"catalogue and inventory in {catalogue.path}"
        )
        serve.wait_for_health(f"{approval_url}/healthz")
        say(f"approval endpoint: autoexec serve on {approval_url} (the emails' links open it)")
        say(
            f"clock: {start:%Y-%m-%d %H:%M:%S} UTC, injected: the ledger and the supplier API "
            f"read {clock.path}; the demo moves it to each next due time instead of waiting"
        )
        say(f"ledger: {ledger.display_url}")
        record = SupplierApi(secret, api_db, catalogue=catalogue)
        before = RunMarks.take(record, ledger, day)
        links = ApprovalLinks(base_url=approval_url, secret=approval_secret)
        channels = stock_channels(
            urls=ready["urls"], smtp_port=sink.port, catalogue=catalogue.path, clock=clock.read
        )
        defs = build_defs(
            stock_execution=build_stock_replenishment_execution_defs(
                channels=channels, ledger=ledger, approval_links=links
            )
        )
        instance = stack.enter_context(dg.DagsterInstance.get())
        train(instance, run_config=config)
        scored = score(defs, instance, day, run_config=config)
        reports = execute_new_days(defs, instance, home, run_config=config)
        decide(ledger, day, sink.messages)
        reports += advance_until_done(
            defs, instance, ledger, clock, home, run_config=config, start=start
        )
        outcome = StockOutcome.from_ledger(ledger, day)
        applied = catalogue.applied_orders()
        drafted = [str(o.draft.get("po_id")) for o in outcome.orders.values() if o.draft]
        mine = applied[applied["po_id"].isin(drafted)]
        print_summary(
            outcome,
            scored=scored,
            reports=reports,
            inventory_units=int(mine["quantity"].sum()) if len(mine) else 0,
        )
        print_backtest(day, load_model(defs, instance))
        print_look_further(outcome, ledger_url=ledger_url, api_db=api_db, catalogue=catalogue.path)
        sent = sum(int((r.get("workflows") or {}).get("notifications", 0)) for r in reports)
        ok = check_records(
            outcome,
            api=record,
            ledger=ledger,
            applied=applied,
            mail_sent=sent,
            mail_received=sink.deliveries,
            at=clock.read(),
            before=before,
        )
    say("done" if ok else "done, but the records disagree (see above)")
    return 0 if ok else 1
