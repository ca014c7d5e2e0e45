"""Bad input to the escalation queue: each refused with a clear message, and nothing written.

Every case runs against a real SQLite ledger holding an executed churn partition and compares
every row of the escalation, outbox and suppression tables before and after.
"""

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from autoexec_dagster.cli import cli
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.escalations import EscalationError
from tests.test_ledger_escalations import (
    PLAYBOOK,
    Recorder,
    execute_partition,
    open_keys,
    snapshot,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One executed ledger file, copied for each case (execution is the slow part)."""
    path = tmp_path_factory.mktemp("escalations") / "ledger.db"
    ledger = ActionLedger(f"sqlite:///{path}")
    execute_partition(ledger, "p1", channels=Recorder().channels())
    key = open_keys(ledger, "vip_at_risk")[-1]
    # One decided escalation, so "not open" has something to hit.
    ledger.approve_escalations([key], by="ana", via="cli")
    ledger.dispose()
    return path


@pytest.fixture
def ledger(template: Path, tmp_path: Path) -> ActionLedger:
    copy = tmp_path / "ledger.db"
    copy.write_bytes(template.read_bytes())
    return ActionLedger(f"sqlite:///{copy}")


def _keys(ledger: ActionLedger) -> dict[str, str]:
    decided = ledger.select_escalations(playbook=PLAYBOOK, statuses=("approved",))
    return {
        "vip": open_keys(ledger, "vip_at_risk")[0],
        "unsure": open_keys(ledger, "unsure")[0],
        "decided": str(decided["idempotency_key"].iloc[0]),
    }


API_CASES: list[tuple[str, Callable[[ActionLedger, dict[str, str]], Any], str]] = [
    (
        "unknown key",
        lambda led, k: led.approve_escalations([k["vip"], "f" * 32], by="ana"),
        r"f{32}: no escalation has this key",
    ),
    (
        "not open",
        lambda led, k: led.approve_escalations([k["vip"], k["decided"]], by="bob"),
        r"not open \(it is approved by ana via cli",
    ),
    (
        "no proposed action",
        lambda led, k: led.approve_escalations([k["unsure"]], by="ana"),
        "proposes no action to approve",
    ),
    (
        "reject without note",
        lambda led, k: led.reject_escalations([k["vip"]], by="ana", note=""),
        "a rejection needs a note",
    ),
    (
        "reject with a note that is not text",
        lambda led, k: led.reject_escalations([k["vip"]], by="ana", note=3),  # type: ignore[arg-type]
        "the note must be text",
    ),
    (
        "suppress with an unparsable duration",
        lambda led, k: led.suppress_escalations([k["vip"]], for_="thirty days", by="a", note="x"),
        r"'thirty days' is not a duration",
    ),
    (
        "suppress for a negative period",
        lambda led, k: led.suppress_escalations([k["vip"]], for_=-60, by="a", note="x"),
        "must be a positive duration",
    ),
    (
        "suppress without note",
        lambda led, k: led.suppress_escalations([k["vip"]], for_="1d", by="a", note=" "),
        "a suppression needs a note",
    ),
    ("no keys", lambda led, k: led.resolve_escalations([], by="ana"), "no escalation key given"),
    ("blank key", lambda led, k: led.resolve_escalations([" "], by="ana"), "non-empty text"),
    (
        "blank decider",
        lambda led, k: led.resolve_escalations([k["vip"]], by=" "),
        "needs the decider's name",
    ),
    (
        "unknown via",
        lambda led, k: led.approve_escalations([k["vip"]], by="ana", via="email"),
        "via must be one of",
    ),
    (
        "filter that does not parse",
        lambda led, k: led.select_escalations(playbook=PLAYBOOK, where="lifetime_value >>= 1"),
        "the filter cannot be used: .* does not parse",
    ),
    (
        "filter that calls a function",
        lambda led, k: led.select_escalations(playbook=PLAYBOOK, where="abs(lifetime_value) > 1"),
        "uses Call",
    ),
    (
        "filter over a column the data lacks",
        lambda led, k: led.select_escalations(playbook=PLAYBOOK, where="segment == 'smb'"),
        r"reads column\(s\) 'segment'",
    ),
    (
        "filter comparing text with a number",
        lambda led, k: led.select_escalations(playbook=PLAYBOOK, where="name > 3"),
        "failed to evaluate",
    ),
    (
        "sort by an unknown column",
        lambda led, k: led.select_escalations(playbook=PLAYBOOK, sort="segment"),
        "cannot sort by 'segment'",
    ),
    (
        "unknown status",
        lambda led, k: led.select_escalations(playbook=PLAYBOOK, statuses=["closed"]),
        r"unknown escalation status\(es\) \['closed'\]",
    ),
    (
        "suppress entities with a blank id",
        lambda led, k: led.suppress_entities(
            playbook=PLAYBOOK, entity_ids=["C000001", ""], for_="1d", by="a", note="x"
        ),
        "entity ids must be non-empty text",
    ),
]


@pytest.mark.parametrize(("case", "call", "message"), API_CASES, ids=[c[0] for c in API_CASES])
def test_the_python_api_refuses_bad_input_and_writes_nothing(
    ledger: ActionLedger,
    case: str,
    call: Callable[[ActionLedger, dict[str, str]], Any],
    message: str,
) -> None:
    keys = _keys(ledger)
    before = snapshot(ledger)

    with pytest.raises(EscalationError, match=message):
        call(ledger, keys)

    assert snapshot(ledger) == before, case


CLI_CASES: list[tuple[str, list[str], str]] = [
    ("unknown key", ["escalations", "approve", "f" * 32, "--by", "ana"], "no escalation has"),
    ("unknown prefix", ["escalations", "approve", "ffffff0", "--by", "ana"], "no escalation has"),
    ("prefix too short", ["escalations", "reject", "abc", "--by", "a", "--note", "x"], "6 char"),
    ("not open", ["escalations", "approve", "{decided}", "--by", "bob"], "not open"),
    (
        "not open, with an open one",
        ["escalations", "resolve", "{vip}", "{decided}", "--by", "bob"],
        r"nothing decided \(1 of 2",
    ),
    ("no proposed action", ["escalations", "approve", "{unsure}", "--by", "a"], "proposes no"),
    ("reject without note", ["escalations", "reject", "{vip}", "--by", "ana"], "--note"),
    (
        "reject with a blank note",
        ["escalations", "reject", "{vip}", "--by", "ana", "--note", "  "],
        "a rejection needs a note",
    ),
    (
        "suppress with an unparsable duration",
        ["escalations", "suppress", "{vip}", "--for", "30 days", "--by", "a", "--note", "x"],
        "'30 days' is not a duration",
    ),
    (
        "suppress without --for",
        ["escalations", "suppress", "{vip}", "--by", "a", "--note", "x"],
        "--for",
    ),
    (
        "filter that does not parse, listing",
        ["escalations", "-p", PLAYBOOK, "--where", "lifetime_value >>= 1"],
        "does not parse",
    ),
    (
        "filter that does not parse, bulk",
        ["escalations", "approve", "-p", PLAYBOOK, "--where", "ltv >", "--by", "a", "--yes"],
        "does not parse",
    ),
    (
        "sort by an unknown column",
        ["escalations", "-p", PLAYBOOK, "--sort", "-segment"],
        "cannot sort by 'segment'",
    ),
    ("listing without a playbook", ["escalations"], "Missing option '--playbook'"),
    (
        "selection without a playbook",
        ["escalations", "approve", "--rule", "vip_at_risk", "--by", "a", "--yes"],
        "needs --playbook",
    ),
    (
        "keys and a selection",
        ["escalations", "approve", "{vip}", "-p", PLAYBOOK, "--rule", "r", "--by", "a"],
        "not both",
    ),
    ("neither keys nor a selection", ["escalations", "approve", "--by", "a"], "give escalation"),
    (
        "a selection nothing matches",
        ["escalations", "approve", "-p", PLAYBOOK, "--rule", "nope", "--by", "a", "--yes"],
        "no open escalation matches",
    ),
    (
        "total of an unknown column",
        [
            "escalations",
            "approve",
            "-p",
            PLAYBOOK,
            "--rule",
            "vip_at_risk",
            "--total",
            "revenue",
            "--by",
            "a",
            "--yes",
        ],
        "--total 'revenue'",
    ),
    (
        "total of a personal column",
        [
            "escalations",
            "approve",
            "-p",
            PLAYBOOK,
            "--rule",
            "vip_at_risk",
            "--total",
            "email",
            "--by",
            "a",
            "--yes",
        ],
        "personal column",
    ),
    ("blank decider", ["escalations", "approve", "{vip}", "--by", "  "], "decider's name"),
    (
        "a bulk decision not confirmed",
        ["escalations", "approve", "-p", PLAYBOOK, "--rule", "vip_at_risk", "--by", "a"],
        "Aborted",
    ),
    ("json and csv at once", ["escalations", "-p", PLAYBOOK, "--json", "--csv"], "one of"),
    (
        "lift what is not suppressed",
        ["escalations", "lift", "C000001", "-p", PLAYBOOK, "--by", "a"],
        "no active suppression",
    ),
]


def _run(ledger: ActionLedger, args: list[str], keys: dict[str, str]) -> Result:
    filled = [a.format(**keys) for a in args]
    url = ledger.url.render_as_string(hide_password=False)
    return CliRunner().invoke(
        cli, filled, env={"AUTOEXEC_LEDGER_URL": url}, input="n\n", catch_exceptions=False
    )


@pytest.mark.parametrize(("case", "args", "message"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_the_command_line_refuses_bad_input_and_writes_nothing(
    ledger: ActionLedger, case: str, args: list[str], message: str
) -> None:
    keys = _keys(ledger)
    before = snapshot(ledger)

    result = _run(ledger, args, keys)

    assert result.exit_code != 0, (case, result.output)
    assert "Traceback" not in result.output
    assert re.search(message, result.output), (case, result.output)
    assert snapshot(ledger) == before, case


def test_a_key_prefix_with_like_wildcards_names_no_escalation(ledger: ActionLedger) -> None:
    before = snapshot(ledger)

    result = _run(ledger, ["escalations", "resolve", "%%%%%%", "_" * 8, "--by", "ana"], {})

    assert result.exit_code == 2 and "no escalation has a key starting with" in result.output
    assert ledger.match_escalation_keys(["%%%%%%", "______"]) == {"%%%%%%": [], "______": []}
    assert snapshot(ledger) == before
