"""Recording a plan in the ledger before anything is sent.

Every entity gets a row: escalations, holdouts and skips are final at once; actions are reserved
with their request data, so the delivery engine sends them from the ledger alone. A key that exists
already is an entity an earlier run handled: it is counted, never sent again.

An entity a person suppressed in the playbook (:mod:`~autoexec_dagster.ledger.suppressions`) gets
no action, workflow or new escalation while the suppression lasts: its row is recorded as skipped,
with who suppressed it and until when. A rule escalation that proposes an action
(``Rule(escalate=..., action=...)``) carries it to the queue, where a person may approve it.
"""

import math
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from autoexec_dagster.budgets import Budget
from autoexec_dagster.channels.base import Channel
from autoexec_dagster.executor.report import ExecutionReport
from autoexec_dagster.experiments.experiment import Experiment
from autoexec_dagster.keys import escalation_dedupe_key, workflow_label
from autoexec_dagster.ledger import payload
from autoexec_dagster.ledger.action_ledger import ActionLedger
from autoexec_dagster.ledger.experiment_store import ExperimentState
from autoexec_dagster.ledger.queries import COOLDOWN_DETAIL, STILL_OPEN_DETAIL
from autoexec_dagster.ledger.schema import (
    DRY_RUN,
    ESCALATED,
    FINAL_STATES,
    HELD_OUT,
    HOLDOUT,
    RESERVED,
    SKIPPED,
    TREATED,
    WORKFLOW,
)
from autoexec_dagster.ledger.suppressions import Suppression
from autoexec_dagster.routing import PLAN_ATTRS, PLAN_COLUMNS
from autoexec_dagster.workflows.workflow import Workflow

RECORD_CHUNK = 5_000
DRY_PREFIX = "dry:"
# Decisions a suppression stops: each would act on the entity or put it before a person.
_SUPPRESSIBLE = frozenset({"act", "escalate", "workflow"})
_STATE_FOR_DECISION = {
    "escalate": ESCALATED,
    "holdout": HELD_OUT,
    "skip": SKIPPED,
    "workflow": WORKFLOW,
}


def entity_data(record: Mapping[Any, Any]) -> dict[str, Any]:
    """What an escalation shows a person of an entity: its insight columns, not routing ones."""
    return {str(k): v for k, v in record.items() if k not in PLAN_COLUMNS or k == "entity_id"}


def _action_name(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def record_plan(
    ledger: ActionLedger,
    keyed: pd.DataFrame,
    report: ExecutionReport,
    *,
    channels: Mapping[str, Channel],
    run_id: str | None,
    dry: bool,
    cooldown: Mapping[tuple[str, str], datetime],
    starts: Mapping[str, tuple[str, Workflow]] | None = None,
    experiments: Mapping[str, tuple[Experiment, ExperimentState]] | None = None,
    measured: Collection[str] = (),
    budgets: Sequence[Budget] = (),
) -> dict[str, list[str]]:
    """Record every entity in the ledger; return the keys still to send, per action.

    Works in chunks so a million-row plan never holds a million row dicts at once. Actions in
    ``cooldown`` (the entity got the same action recently) are recorded as skipped, with why. A
    rule escalation whose case (entity and rule) is still open from another partition is recorded
    as escalated there and not opened again; the report counts it per partition. An entity routed
    to a workflow (``starts``: rule name -> the workflow's name and definition) starts one instance, keyed like the
    decision, due at once. An entity suppressed in the playbook (by the ledger's clock) gets no
    action, workflow or escalation: its row is recorded as skipped, naming who suppressed it and
    until when, and a pending action an earlier run left for it is skipped, not sent.

    An action whose rule runs an experiment (``experiments``: rule name -> the experiment and its
    ledger state) is assigned its variant here, sticky per entity, and the row records it. For
    the actions in ``measured`` each new action and holdout row is recorded as an exposure, the
    unit outcomes are joined to.

    With ``budgets`` (the playbook's), each new action spends from them as it is reserved, in
    the same transaction; one a budget refuses is recorded as skipped, naming the budget, and
    counted as ``over_budget``.
    """
    info = keyed.attrs[PLAN_ATTRS]
    partition = info["partition_key"] or ""
    base = {
        "playbook": info["playbook"],
        "playbook_version": info["playbook_version"],
        "insight": info["insight"],
        "partition_key": partition,
        "run_id": run_id,
    }
    delivery = {name: ch.delivery for name, ch in channels.items()}
    to_send: dict[str, list[str]] = {}
    keys_all = keyed["idempotency_key"].to_numpy()
    entity_all = keyed["entity_id"].to_numpy()
    decision_all = keyed["decision"].astype(str).to_numpy()
    rule_all = keyed["rule"].astype(str).to_numpy()
    action_all = keyed["action"].astype(object).to_numpy()
    reason_all = keyed["reason"].astype(str).to_numpy()
    suppressions = _suppressions(ledger, info["playbook"], entity_all, decision_all)
    for start in range(0, len(keyed), RECORD_CHUNK):
        stop = min(start + RECORD_CHUNK, len(keyed))
        positions = range(start, stop)
        suppressed: dict[int, Suppression] = (
            {
                i: suppressions[str(entity_all[i])]
                for i in positions
                if decision_all[i] in _SUPPRESSIBLE and str(entity_all[i]) in suppressions
            }
            if suppressions
            else {}
        )
        escalating = [i for i in positions if decision_all[i] == "escalate" and i not in suppressed]
        cases = {
            i: escalation_dedupe_key(
                playbook=info["playbook"], entity_id=str(entity_all[i]), rule=rule_all[i]
            )
            for i in escalating
        }
        open_elsewhere: dict[int, str] = {}
        if cases and not dry:
            found = ledger.open_cases(list(cases.values()))
            open_elsewhere = {
                i: found[case]
                for i, case in cases.items()
                if case in found and found[case] != partition
            }
        sending = [
            i
            for i in positions
            if decision_all[i] == "act"
            and not dry
            and i not in suppressed
            and cooldown.get((entity_all[i], str(action_all[i]))) is None
        ]
        data = dict(
            zip(sending, keyed.iloc[sending].to_dict("records"), strict=True) if sending else ()
        )
        variants = (
            _assign(ledger, info, sending, entity_all, rule_all, keys_all, experiments)
            if experiments and sending
            else {}
        )
        rows: list[dict[str, Any]] = []
        for i in positions:
            decision = decision_all[i]
            action = _action_name(action_all[i])
            detail = None
            last = cooldown.get((entity_all[i], action)) if decision == "act" and action else None
            if last is not None:
                detail = f"{COOLDOWN_DETAIL} {action} delivered {last:%Y-%m-%d %H:%M} UTC"
            elif decision == "workflow" and starts and rule_all[i] in starts:
                workflow = starts[rule_all[i]][0]
                last = cooldown.get((entity_all[i], workflow_label(workflow)))
                if last is not None:
                    detail = (
                        f"{COOLDOWN_DETAIL} workflow {workflow} started {last:%Y-%m-%d %H:%M} UTC"
                    )
            if i in open_elsewhere:
                detail = f"{STILL_OPEN_DETAIL} {open_elsewhere[i]}"
            hold = suppressed.get(i)
            if hold is not None:
                detail = hold.detail()
            if dry:
                # A suppressed entity would not be acted on: the dry run says so too.
                key = DRY_PREFIX + keys_all[i]
                state = SKIPPED if hold is not None else DRY_RUN
            else:
                key = keys_all[i]
                if last is not None or hold is not None:
                    state = SKIPPED
                else:
                    state = RESERVED if decision == "act" else _STATE_FOR_DECISION[decision]
            row: dict[str, Any] = {
                **base,
                "idempotency_key": key,
                "entity_id": entity_all[i],
                "rule": rule_all[i],
                "action": action,
                "decision": decision,
                "state": state,
                "delivery": delivery.get(action or "", "at_least_once"),
                "detail": detail,
                "variant": variants[i][0] if i in variants else None,
            }
            if i in data:
                row["data"] = data[i]
            rows.append(row)
        # Without budgets this is ledger.reserve; dry-run rows are never reserved, so never spend.
        keys, refused = ledger.reserve_within_budgets(rows, budgets=budgets)
        inserted = set(keys)
        for row in rows if refused else ():
            why = refused.get(row["idempotency_key"])
            if why is not None:
                row["state"], row["detail"] = SKIPPED, why
        existing = [r["idempotency_key"] for r in rows if r["idempotency_key"] not in inserted]
        states = ledger.states(existing) if existing else {}
        existing_workflows = [
            r["idempotency_key"]
            for r in rows
            if r["decision"] == "workflow" and r["idempotency_key"] not in inserted and not dry
        ]
        existing_instances = (
            ledger.instances_exist(existing_workflows) if existing_workflows else {}
        )
        new_escalations: list[int] = []
        new_instances: list[int] = []
        stale: dict[str, str] = {}
        for offset, row in enumerate(rows):
            position = start + offset
            decision = row["decision"]
            action = row["action"] or ""
            hold = suppressed.get(position)
            if hold is not None:
                state, _worker = states.get(row["idempotency_key"], (None, None))
                if row["idempotency_key"] in inserted or (
                    decision == "act" and not dry and state not in FINAL_STATES
                ):
                    # Recorded as skipped now, or left pending by an earlier run: not sent.
                    if row["idempotency_key"] not in inserted:
                        stale[row["idempotency_key"]] = hold.detail()
                    report.skipped += 1
                    if decision == "act":
                        report.count(action, "suppressed")
                else:
                    report.already_done += 1
                    if decision == "act":
                        report.count(action, "already_done")
                continue
            if row["idempotency_key"] in refused:
                report.over_budget += 1
                report.count(action, "over_budget")
                continue
            if row["idempotency_key"] in inserted:
                if decision == "act" and row["detail"] is not None:
                    report.cooled_down += 1
                    report.count(action, "cooldown")
                elif decision == "act":
                    if dry:
                        report.dry_run_actions += 1
                        report.count(action, "dry_run")
                    else:
                        to_send.setdefault(action, []).append(row["idempotency_key"])
                elif decision == "escalate":
                    if dry:
                        report.escalated += 1
                    elif position in open_elsewhere:
                        report.note_still_open(open_elsewhere[position])
                    else:
                        new_escalations.append(position)
                elif decision == "holdout":
                    report.held_out += 1
                    report.count(action, "held_out")
                elif decision == "workflow" and row["detail"] is not None:
                    # Started for this entity in another partition within the cooldown.
                    report.cooled_down += 1
                elif decision == "workflow":
                    if dry:
                        report.dry_run_workflows += 1
                    else:
                        new_instances.append(position)
                else:
                    report.skipped += 1
                continue
            state, _worker = states.get(row["idempotency_key"], (None, None))
            if decision == "act" and not dry and state not in FINAL_STATES:
                # Reserved, or in doubt after an earlier crash: send it now.
                to_send.setdefault(action, []).append(row["idempotency_key"])
            elif (
                decision == "workflow"
                and not dry
                and state == WORKFLOW
                and not existing_instances.get(row["idempotency_key"], True)
            ):
                # Recorded by a run that died before starting its instance: start it now.
                new_instances.append(position)
            else:
                report.already_done += 1
                if decision == "act":
                    report.count(action, "already_done")
        if measured and not dry:
            # Rows an earlier run reserved but never finished (a crash) are exposures too: the
            # record of them may be what the crash lost. Recording is idempotent.
            pending = {k for k, (state, _w) in states.items() if state not in FINAL_STATES}
            _record_exposures(
                ledger,
                rows,
                (inserted - refused.keys()) | pending,
                info=info,
                measured=measured,
                variants={rows[p - start]["idempotency_key"]: v for p, v in variants.items()},
                experiments=experiments or {},
            )
        if stale:
            ledger.skip_suppressed(stale)
        if new_instances:
            _start_instances(
                ledger,
                keyed,
                report,
                positions=new_instances,
                info=info,
                run_id=run_id,
                starts=starts or {},
            )
        if new_escalations:
            _open_rule_escalations(
                ledger,
                keyed,
                report,
                positions=new_escalations,
                cases=cases,
                info=info,
                reasons=reason_all,
            )
    return to_send


def _assign(
    ledger: ActionLedger,
    info: Mapping[str, Any],
    sending: list[int],
    entity_all: np.ndarray,
    rule_all: np.ndarray,
    keys_all: np.ndarray,
    experiments: Mapping[str, tuple[Experiment, ExperimentState]],
) -> dict[int, tuple[str, bool]]:
    """Position -> (variant, counted in the test) for the actions of experiment rules.

    An action an earlier run finished is not assigned: it was sent before (perhaps before the
    experiment existed), so drawing a variant for it now would count an entity that never saw
    one.
    """
    out: dict[int, tuple[str, bool]] = {}
    candidates = [i for i in sending if rule_all[i] in experiments]
    if not candidates:
        return out
    states = ledger.states([str(keys_all[i]) for i in candidates])
    by_rule: dict[str, list[int]] = {}
    for i in candidates:
        state = states.get(str(keys_all[i]), (None, None))[0]
        if state not in FINAL_STATES:
            by_rule.setdefault(str(rule_all[i]), []).append(i)
    for rule, positions in by_rule.items():
        experiment, state = experiments[rule]
        assigned = ledger.assign_variants(
            playbook=info["playbook"],
            experiment=experiment,
            state=state,
            entity_ids=[str(entity_all[i]) for i in positions],
            period=info["partition_key"] or "",
        )
        for i in positions:
            out[i] = assigned[str(entity_all[i])]
    return out


def _record_exposures(
    ledger: ActionLedger,
    rows: list[dict[str, Any]],
    inserted: set[str],
    *,
    info: Mapping[str, Any],
    measured: Collection[str],
    variants: Mapping[str, tuple[str, bool]],
    experiments: Mapping[str, tuple[Experiment, ExperimentState]],
) -> None:
    """Exposures of the rows this call inserted: new actions (with their variant) and holdouts."""
    running = {
        state.action: experiment.name for experiment, state in experiments.values() if state.active
    }
    exposures = []
    for row in rows:
        key = row["idempotency_key"]
        action = row["action"]
        if key not in inserted or action not in measured:
            continue
        if row["state"] == RESERVED:
            variant, counted = variants.get(key, (None, False))
            arm = variant or TREATED
            experiment = running.get(action, "") if counted else ""
        elif row["state"] == HELD_OUT:
            arm, experiment = HOLDOUT, running.get(action, "")
        else:
            continue
        exposures.append(
            {
                "playbook": info["playbook"],
                "action": action,
                "entity_id": str(row["entity_id"]),
                "partition_key": info["partition_key"] or "",
                "arm": arm,
                "experiment": experiment,
                "idempotency_key": key,
            }
        )
    ledger.record_exposures(exposures)


def _start_instances(
    ledger: ActionLedger,
    keyed: pd.DataFrame,
    report: ExecutionReport,
    *,
    positions: list[int],
    info: Mapping[str, Any],
    run_id: str | None,
    starts: Mapping[str, tuple[str, Workflow]],
) -> None:
    records = keyed.iloc[positions].to_dict("records")
    rows = []
    for record in records:
        rule = str(record["rule"])
        name, workflow = starts[rule]
        rows.append(
            {
                "instance_id": str(record["idempotency_key"]),
                "playbook": info["playbook"],
                "playbook_version": info["playbook_version"],
                "workflow": name,
                "insight": info["insight"],
                "partition_key": info["partition_key"] or "",
                "entity_id": str(record["entity_id"]),
                "rule": rule,
                "step": workflow.steps[0].name,
                "data": payload.dumps(entity_data(record)),
                "run_id": run_id,
            }
        )
    report.workflows_started += len(ledger.start_instances(rows))


def _open_rule_escalations(
    ledger: ActionLedger,
    keyed: pd.DataFrame,
    report: ExecutionReport,
    *,
    positions: list[int],
    cases: Mapping[int, str],
    info: Mapping[str, Any],
    reasons: Any,
) -> None:
    records = keyed.iloc[positions].to_dict("records")
    rows = [
        {
            "idempotency_key": str(record["idempotency_key"]),
            "playbook": info["playbook"],
            "playbook_version": info["playbook_version"],
            "insight": info["insight"],
            "partition_key": info["partition_key"] or "",
            "entity_id": str(record["entity_id"]),
            "rule": str(record["rule"]),
            "kind": "rule",
            "reason": reasons[p],
            "data": entity_data(record),
            "dedupe_key": cases[p],
            # The rule's proposed action (Rule(escalate=..., action=...)), for a person to approve.
            "proposed_action": _action_name(record.get("action")),
        }
        for p, record in zip(positions, records, strict=True)
    ]
    opened = set(ledger.open_escalations(rows))
    lost_race = [
        p for p, r in zip(positions, rows, strict=True) if r["idempotency_key"] not in opened
    ]
    elsewhere = ledger.open_cases([cases[p] for p in lost_race]) if lost_race else {}
    for p, row in zip(positions, rows, strict=True):
        if row["idempotency_key"] in opened:
            report.escalated += 1
            report.note_escalation(reasons[p])
        else:
            # Another partition's run opened the same case at the same moment.
            report.note_still_open(elsewhere.get(cases[p], "?"))


def _suppressions(
    ledger: ActionLedger, playbook: str, entity_ids: np.ndarray, decisions: np.ndarray
) -> dict[str, Suppression]:
    """Suppressions in force now (the ledger's clock) for the plan's entities that would be acted
    on or escalated; one indexed count when the playbook has none."""
    candidates = entity_ids[np.isin(decisions, sorted(_SUPPRESSIBLE))]
    if not len(candidates):
        return {}
    # Entity ids are text in a routed plan; the ledger converts nothing unless one is suppressed.
    return ledger.active_suppressions(playbook=playbook, entity_ids=candidates.tolist())
