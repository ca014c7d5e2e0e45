"""The learnings of an experiment, as Markdown: what was asked, tried, decided and why."""

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoexec_dagster.experiments.update import ExperimentResult


def _pct(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.{digits}%}"


def _rate(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2%}"


def _interval(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"[{low:+.1%}, {high:+.1%}]"


def _number(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _difference(value: float, low: float, high: float, *, binary: bool) -> str:
    if binary:
        return f"{value * 100:+.1f} pts [{low * 100:+.1f}, {high * 100:+.1f}]"
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


def _vs_holdout(row: Mapping[Any, Any], *, binary: bool, held: bool) -> str:
    """The relative lift against the holdout, or the difference when the holdout's rate is 0."""
    if not held:
        return "no holdout"
    if math.isfinite(row["lift_vs_holdout"]) and math.isfinite(row["lift_vs_holdout_low"]):
        return (
            f"{_pct(row['lift_vs_holdout'])} "
            f"{_interval(row['lift_vs_holdout_low'], row['lift_vs_holdout_high'])}"
        )
    if math.isfinite(row.get("difference_vs_holdout", math.nan)):
        difference = _difference(
            row["difference_vs_holdout"],
            row["difference_vs_holdout_low"],
            row["difference_vs_holdout_high"],
            binary=binary,
        )
        return f"{difference} (holdout at 0: no relative lift)"
    return "n/a (too few outcomes)"


def learnings_markdown(result: "ExperimentResult") -> str:
    """Markdown for the ``<playbook>/learnings`` asset and for people."""
    lines = [
        f"# Learnings: {result.experiment}",
        "",
        "## The question",
        f"Which version of the action `{result.action}` of playbook `{result.playbook}` gives "
        f"the best `{result.metric}`"
        + (" (a rate)" if result.binary else " (a mean)")
        + f", against the control `{result.control}` and against doing nothing (the holdout)?",
        "",
        "## The variants",
        "",
        "| variant | status | n | "
        + ("rate" if result.binary else "mean")
        + " | 95% interval | P(best) | expected loss | lift vs control | lift vs holdout | weight |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | --- | ---: |",
    ]
    for row in result.variants.to_dict("records"):
        rate = _rate(row["rate"]) if result.binary else _number(row["rate"])
        interval = (
            f"[{_rate(row['ci_low'])}, {_rate(row['ci_high'])}]"
            if result.binary
            else f"[{_number(row['ci_low'])}, {_number(row['ci_high'])}]"
        )
        vs_control = (
            "control"
            if row["variant"] == result.control
            else f"{_pct(row['lift_vs_control'])} "
            f"{_interval(row['lift_vs_control_low'], row['lift_vs_control_high'])}"
        )
        vs_holdout = _vs_holdout(row, binary=result.binary, held=result.holdout_n > 0)
        lines.append(
            f"| {row['variant']} | {row['status']} | {int(row['n']):,} | {rate} | {interval} | "
            f"{row['probability_best']:.3f} | {_number(row['expected_loss'])} | {vs_control} | "
            f"{vs_holdout} | {row['weight']:.0%} |"
        )
    lines += [
        "",
        f"Holdout: {result.holdout_n:,} entities, "
        + (_rate(result.holdout_rate) if result.binary else _number(result.holdout_rate))
        + f". Sample-ratio check: p = {result.srm_p_value:.3g}.",
        "",
        "## The decision",
    ]
    if result.winner is not None and result.decided_at is not None:
        row = {
            str(k): float(v)
            for k, v in result.variants.set_index("variant").loc[result.winner].items()
            if isinstance(v, int | float)
        }
        lines += [
            f"**{result.winner}** was promoted on {result.decided_at:%Y-%m-%d %H:%M} UTC, "
            f"{(result.decided_at - result.started_at).total_seconds() / 86_400:.1f} days after "
            "the start; it now takes all traffic outside the holdout.",
            "",
            f"- Effect against the control: {_pct(row['lift_vs_control'])} "
            f"(95% interval {_interval(row['lift_vs_control_low'], row['lift_vs_control_high'])})"
            if result.winner != result.control
            else "- The control itself won: the variants did not beat it.",
            "- Effect against the holdout: "
            + _vs_holdout(row, binary=result.binary, held=result.holdout_n > 0),
        ]
    elif result.status == "stopped":
        lines.append("The experiment was stopped: every variant crossed a guardrail.")
    else:
        lines.append(f"No decision yet ({result.days_elapsed:.1f} days in): {result.decision}")
    lines += ["", "## Archived and stopped"]
    changes = [e for e in result.events if e["kind"] in ("archived", "stopped")]
    if changes:
        lines += [f"- {e['at']:%Y-%m-%d}: {e['detail']}" for e in changes]
    else:
        lines.append("Nothing yet.")
    lines += ["", "## Caveats"]
    lines += [f"- {c}" for c in result.caveats] or ["- None noted."]
    return "\n".join(lines) + "\n"
