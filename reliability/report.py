"""Turn the fault suites' figures into reliability/RESULTS.md (run by ``make reliability``).

Reads test-artifacts/reliability.jsonl (one JSON line per trial, written by
``tests/reliability.py:record``), prints a Markdown report and writes it next to this file. The
report states what ran, per suite: trials, faults injected, cases, lost and duplicated actions,
backends, and the command that reproduces it, with the date and the machine.
"""

import json
import os
import platform
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIGURES = Path(
    os.environ.get(
        "AUTOEXEC_RELIABILITY_FIGURES", str(ROOT / "test-artifacts" / "reliability.jsonl")
    )
)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Which test file records each suite, so the report can name the command that reproduces it.
SUITE_FILES = {
    "crash_points": "tests/test_crash_points.py",
    "ledger_faults": "tests/test_ledger_faults.py",
    "network_faults": "tests/test_network_faults.py",
    "postgres_restart": "tests/test_postgres_restart.py",
    "bad_input": "tests/test_bad_input_*.py",
    "secrecy": "tests/test_secrecy.py",
    "workflow_crash": "tests/test_workflow_crash.py",
    "approval_crash": "tests/test_approval_crash.py",
}
# The first of these a suite records splits its detail table (kill point, ledger method, ...).
DETAIL_KEYS = ("point", "method", "group", "scope", "mode")


def load(path: Path) -> list[dict[str, Any]]:
    """Every figures line; a torn last line (an interrupted run) is skipped, not fatal."""
    if not path.exists():
        return []
    lines: list[dict[str, Any]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            print(f"skipped a malformed line in {path}: {raw[:80]!r}", file=sys.stderr)
    return lines


def _sum(lines: Iterable[Mapping[str, Any]], key: str) -> int | None:
    values = [int(line[key]) for line in lines if isinstance(line.get(key), int | float)]
    return sum(values) if values else None


def _max(lines: Iterable[Mapping[str, Any]], key: str) -> int | None:
    values = [int(line[key]) for line in lines if isinstance(line.get(key), int | float)]
    return max(values) if values else None


def _text(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _backends(lines: Sequence[Mapping[str, Any]]) -> str:
    found = sorted({str(line["backend"]) for line in lines if line.get("backend")})
    return ", ".join(found) or "-"


def _violations(lines: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for line in lines if line.get("problem"))


def _line_mode(line: Mapping[str, Any]) -> str | None:
    """The run mode a line was recorded in (older lines kept it under "mode", which a suite's
    own fault mode could overwrite: those count as unknown)."""
    mode = line.get("run_mode", line.get("mode"))
    return mode if mode in ("fast", "full") else None


def _run_mode(lines: Sequence[Mapping[str, Any]]) -> str:
    modes = {_line_mode(line) for line in lines} & {"fast", "full"}
    return "full" if "full" in modes or os.environ.get("AUTOEXEC_RELIABILITY") == "full" else "fast"


def _command(suite: str, mode: str) -> str:
    target = SUITE_FILES.get(suite, "tests/")
    prefix = "AUTOEXEC_RELIABILITY=full " if mode == "full" else ""
    return f"`{prefix}.venv/bin/pytest {target} -q`"


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _suite_table(by_suite: Mapping[str, list[dict[str, Any]]], mode: str) -> list[str]:
    out = [
        _row(
            (
                "suite",
                "trials",
                "faults injected",
                "cases",
                "lost",
                "duplicates (max)",
                "duplicates (total)",
                "violations",
                "backends",
                "reproduce",
            )
        ),
        _row(["---"] * 10),
    ]
    for suite, lines in sorted(by_suite.items()):
        out.append(
            _row(
                (
                    suite,
                    f"{len(lines):,}",
                    _text(_sum(lines, "faults")),
                    _text(_sum(lines, "cases")),
                    _text(_sum(lines, "lost")),
                    _text(_max(lines, "duplicates")),
                    _text(_sum(lines, "duplicates")),
                    f"{_violations(lines):,}",
                    _backends(lines),
                    _command(suite, mode),
                )
            )
        )
    return out


def _detail(suite: str, lines: Sequence[Mapping[str, Any]]) -> list[str]:
    key = next((k for k in DETAIL_KEYS if any(k in line for line in lines)), None)
    if key is None:
        return []
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for line in lines:
        groups[(str(line.get(key, "-")), str(line.get("backend", "-")))].append(line)
    out = [
        "",
        f"### {suite} by {key}",
        "",
        _row(
            (
                key,
                "backend",
                "trials",
                "actions (max)",
                "in flight (max)",
                "lost",
                "duplicates (max)",
                "duplicates (total)",
                "violations",
            )
        ),
        _row(["---"] * 9),
    ]
    for (name, backend), group in sorted(groups.items()):
        out.append(
            _row(
                (
                    name,
                    backend,
                    f"{len(group):,}",
                    _text(_max(group, "actions")),
                    _text(_max(group, "in_flight")),
                    _text(_sum(group, "lost")),
                    _text(_max(group, "duplicates")),
                    _text(_sum(group, "duplicates")),
                    f"{_violations(group):,}",
                )
            )
        )
    outcomes = sorted({str(line["outcome"]) for line in lines if "outcome" in line})
    if outcomes:
        counts = {o: sum(1 for line in lines if str(line.get("outcome")) == o) for o in outcomes}
        out += [
            "",
            "Outcomes of the faulted runs: " + ", ".join(f"{o} {n:,}" for o, n in counts.items()),
        ]
    problems = [str(line["problem"]) for line in lines if line.get("problem")]
    if problems:
        out += ["", f"First violations ({len(problems):,} in all):", ""]
        out += [f"- {p[:300]}" for p in problems[:5]]
    return out


def render(lines: Sequence[dict[str, Any]], *, now: datetime | None = None) -> str:
    """The Markdown report of one run's figures."""
    moment = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    mode = _run_mode(lines)
    # Fast-mode lines written meanwhile by other test runs on the machine are not this run's.
    lines = [line for line in lines if _line_mode(line) in (mode, None)]
    by_suite: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        by_suite[str(line.get("suite", "?"))].append(line)
    out = [
        "# Reliability results",
        "",
        f"Generated {moment} by `reliability/report.py` from `{FIGURES.relative_to(ROOT) if FIGURES.is_relative_to(ROOT) else FIGURES}`.",
        f"Machine: {os.cpu_count()} CPUs (nproc), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}. Mode: {mode}.",
        "",
        "Reproduce everything with `make reliability` (full mode: "
        "`AUTOEXEC_RELIABILITY=full`); each suite's own command is in its row.",
        "",
        "- *lost*: actions the receiver never saw after the re-run; must be 0.",
        "- *duplicates*: repeated requests for an idempotency key (a deduping receiver "
        "acknowledges them without a second effect); each trial asserts they do not exceed the "
        "rows it measured in flight (claimed, not completed) when the fault hit.",
        "- *violations*: trials that broke a promise (recorded before the assertion; an expected "
        "failure of an open defect shows up here).",
        "",
    ]
    if not lines:
        out.append("No figures were recorded: did the fault suites run?")
        return "\n".join(out) + "\n"
    out += _suite_table(by_suite, mode)
    for suite, suite_lines in sorted(by_suite.items()):
        out += _detail(suite, suite_lines)
    return "\n".join(out) + "\n"


def main() -> int:
    text = render(load(FIGURES))
    RESULTS.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
