"""``autoexec backtest``: replay a playbook over past insight partitions, with no side effect."""

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import pandas as pd

from autoexec_dagster.backtest import AS_WRITTEN, BacktestReport, approval_steps, backtest
from autoexec_dagster.cli.common import cli, echo_json, fail, records, table
from autoexec_dagster.playbook import Playbook

# Insight files a partition may be read from, by suffix.
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}\Z")


@cli.command(name="backtest")
@click.option(
    "--playbook",
    "-p",
    "playbook_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The playbook YAML file to replay.",
)
@click.option(
    "--insights",
    "-i",
    "insight_paths",
    multiple=True,
    metavar="PATH...",
    help="Past insight partitions: parquet or CSV files (the partition key is the file's stem), "
    "or directories of them. Further paths may follow.",
)
@click.argument("more_paths", nargs=-1, metavar="[PATH]...")
@click.option(
    "--assume",
    "assumptions",
    multiple=True,
    metavar="STEP.FIELD=EXPR",
    help="What a step output would be, over insight columns, e.g. "
    "'draft_po.total=reorder_qty * unit_cost' (no step runs in a backtest). Repeatable.",
)
@click.option(
    "--approve-when",
    "approve_when",
    multiple=True,
    metavar="LABEL[:STEP]=EXPR",
    help="A scenario: the approval step's condition replaced, e.g. "
    "'10k=`draft_po.total` > 10000'; STEP may be left out when the playbook has one approval "
    "step. Repeatable; the playbook as written is always compared too.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (partitions and totals).")
@click.option("--csv", "as_csv", is_flag=True, help="Print one CSV row per partition and scenario.")
def backtest_command(
    playbook_path: Path,
    insight_paths: tuple[str, ...],
    more_paths: tuple[str, ...],
    assumptions: tuple[str, ...],
    approve_when: tuple[str, ...],
    as_json: bool,
    as_csv: bool,
) -> None:
    """Replay a playbook over past insight partitions: flagged, autonomous, escalated and approvals
    needed (count and value) per partition, for each threshold side by side.

    Nothing is executed or recorded: no ledger is opened, no channel is contacted.
    """
    if as_json and as_csv:
        fail("choose one of --json and --csv")
    paths = [*insight_paths, *more_paths]
    if not paths:
        fail("give the insight partitions to replay with --insights PATH...")
    playbook = Playbook.from_yaml(playbook_path)
    insights = load_insights(paths)
    assume = parse_assumptions(assumptions)
    scenarios = parse_scenarios(approve_when, playbook=playbook)
    report = backtest(playbook=playbook, insights=insights, assume=assume, scenarios=scenarios)
    if as_json:
        echo_json(
            {
                **report.as_dict(),
                "partitions": records(report.frame),
                "totals": records(report.totals),
            }
        )
    elif as_csv:
        click.echo(report.frame.to_csv(index=False), nl=False)
    else:
        click.echo(render(report))


def load_insights(paths: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Partition key (file stem) -> insight, from files and directories of parquet or CSV files.

    Exits with an error naming the path when a file does not load, a directory holds no insight
    file, a suffix is not parquet or CSV, or two files give the same partition key.
    """
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in (*PARQUET_SUFFIXES, *CSV_SUFFIXES)
            )
            if not found:
                fail(f"{path} holds no parquet or CSV file")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            fail(f"insight file {path} does not exist")
    insights: dict[str, pd.DataFrame] = {}
    origin: dict[str, Path] = {}
    for file in files:
        key = file.stem
        if key in insights:
            fail(f"{file} and {origin[key]} both give partition {key!r}; give one of them")
        insights[key] = _load(file)
        origin[key] = file
    return insights


def _load(file: Path) -> pd.DataFrame:
    suffix = file.suffix.lower()
    if suffix not in (*PARQUET_SUFFIXES, *CSV_SUFFIXES):
        fail(f"{file}: not a parquet (.parquet, .pq) or CSV (.csv) file")
    try:
        if suffix in PARQUET_SUFFIXES:
            return pd.read_parquet(file)
        return pd.read_csv(file)
    except ImportError as exc:
        # pandas reads parquet through pyarrow or fastparquet, neither of which is a dependency.
        fail(f"{file}: reading parquet needs pyarrow (pip install pyarrow): {exc}")
    except Exception as exc:  # whatever the file holds: one line naming it, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        fail(f"{file} does not load as {suffix[1:]}: {first}")


def parse_assumptions(items: Sequence[str]) -> dict[str, str]:
    """``STEP.FIELD=EXPR`` items as a mapping; exits on a malformed or repeated one."""
    assume: dict[str, str] = {}
    for item in items:
        column, equals, source = item.partition("=")
        column, source = column.strip(), source.strip()
        if not equals or not column or not source:
            fail(
                f"--assume {item!r} must be written STEP.FIELD=EXPR, e.g. 'draft_po.total=qty * cost'"
            )
        if column in assume:
            fail(f"--assume gives {column!r} twice")
        assume[column] = source
    return assume


def parse_scenarios(items: Sequence[str], *, playbook: Playbook) -> dict[str, dict[str, str]]:
    """``LABEL[:STEP]=EXPR`` items as backtest scenarios; exits on a malformed or repeated one.

    A label may come back with different steps (one scenario moving two gates); the same label
    for the same step twice is refused.
    """
    gates = approval_steps(playbook)
    scenarios: dict[str, dict[str, str]] = {}
    for item in items:
        head, equals, source = item.partition("=")
        label, colon, step = (part.strip() for part in head.partition(":"))
        source = source.strip()
        if not equals or not label or not source or (colon and not step):
            fail(f"--approve-when {item!r} must be written LABEL=EXPR or LABEL:STEP=EXPR")
        if not _LABEL_RE.match(label):
            fail(
                f"--approve-when {item!r}: the label {label!r} must be letters, digits and "
                "'_.+-' (at most 40 characters)"
            )
        if label == AS_WRITTEN:
            fail(f"--approve-when: the label {AS_WRITTEN!r} is the playbook as written")
        if not step:
            if not gates:
                fail(f"playbook {playbook.name!r} has no approval step for --approve-when")
            if len(gates) > 1:
                names = ", ".join(f"{w}.{s.name}" for w, s in gates)
                fail(
                    f"--approve-when {item!r}: the playbook has several approval steps ({names}); "
                    "write LABEL:STEP=EXPR"
                )
            step = gates[0][1].name
        steps = scenarios.setdefault(label, {})
        if step in steps:
            fail(f"--approve-when: scenario {label!r} is given twice for step {step!r}")
        steps[step] = source
    return scenarios


def render(report: BacktestReport) -> str:
    """The side-by-side table, the totals, and what was blocked or approximated."""
    lines = [
        f"Backtest of playbook {report.playbook!r} over {report.frame['partition'].nunique()} "
        "partition(s); nothing was executed or recorded.",
    ]
    for label in report.scenarios:
        gates = "; ".join(f"{gate}: {cond}" for gate, cond in report.conditions[label].items())
        lines.append(f"  {label}: {gates or 'no approval steps'}")
    side = report.side_by_side()
    lines += ["", table(_readable(side)), "", "Totals", table(_readable(report.totals))]
    if report.blocked:
        lines += ["", "Blocked by a guardrail (the whole batch escalated):"]
        lines += [f"  {key}: {reason}" for key, reason in report.blocked.items()]
    if report.notes:
        lines += ["", "Approximated:"]
        lines += [f"  {note}" for note in report.notes]
    return "\n".join(lines)


# Shorter headings for the terminal; --json and --csv keep the full metric names.
_HEADINGS = {
    "approvals_needed": "approvals",
    "approvals_value": "value",
    "autonomy_rate": "autonomy",
}


def _readable(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    if "blocked" in out.columns and out["blocked"].dtype == bool:
        if out["blocked"].any():
            out["blocked"] = ["yes" if v else "" for v in out["blocked"]]
        else:
            out = out.drop(columns=["blocked"])
    renamed: dict[str, str] = {}
    for column in out.columns:
        metric, bracket, rest = str(column).partition("[")
        if metric == "autonomy_rate":
            out[column] = [_percent(v) for v in out[column]]
        elif metric == "approvals_value":
            out[column] = [f"{v:,.2f}" for v in out[column]]
        if metric in _HEADINGS:
            renamed[column] = _HEADINGS[metric] + bracket + rest
    return out.rename(columns=renamed)


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1%}"
