"""Idempotency keys: the deterministic name of every side effect.

A key names what happens, not how it was decided: hash(insight, partition, action, entity). Neither
the run id nor the playbook version is part of it, so a re-run of a finished partition finds every
action already recorded, and editing a threshold does not re-send to everyone who already got the
action (the version is recorded on the ledger row instead).
"""

import hashlib
from collections.abc import Sequence
from typing import Any

SEP = "\x1f"
BATCH_ENTITY = "*"
BATCH_ACTION = "guardrail:batch"


def idempotency_keys(
    *,
    insight: str,
    partition_key: str,
    actions: Sequence[str],
    entity_ids: Sequence[str],
) -> list[str]:
    """Deterministic idempotency keys: hash(insight, partition, action, entity id).

    Args:
        insight: Insight asset key, as a string.
        partition_key: Insight partition ("" when unpartitioned).
        actions: Per entity: the action, or ``<decision>:<rule>`` for rows without an action.
        entity_ids: Per entity: its id as a string.

    Returns:
        One 32-character hex key (BLAKE2b, 128 bits) per entity.

    Raises:
        ValueError: ``actions`` and ``entity_ids`` differ in length.
    """
    if len(actions) != len(entity_ids):
        raise ValueError("actions and entity_ids must have the same length")
    prefix = SEP.join((insight, partition_key, "")).encode()
    # Entities share a handful of actions: feed insight, partition and action to one hasher per
    # action, then copy it per entity. This keeps 1M keys well under half a second.
    bases: dict[str, Any] = {}
    keys: list[str] = []
    append = keys.append
    for action, entity in zip(actions, entity_ids, strict=True):
        base = bases.get(action)
        if base is None:
            base = bases[action] = hashlib.blake2b(
                prefix + f"{action}{SEP}".encode(), digest_size=16
            )
        hasher = base.copy()
        hasher.update(entity.encode())
        append(hasher.hexdigest())
    return keys


def batch_key(*, insight: str, partition_key: str) -> str:
    """The key of a whole partition's batch, as escalated by a guardrail."""
    return idempotency_keys(
        insight=insight,
        partition_key=partition_key,
        actions=[BATCH_ACTION],
        entity_ids=[BATCH_ENTITY],
    )[0]


def escalation_dedupe_key(*, playbook: str, entity_id: str, rule: str) -> str:
    """What makes two rule escalations the same case: the entity and the rule, any partition.

    An entity whose escalation by a rule is still open is not escalated again by that rule.
    """
    text = SEP.join(("rule", playbook, rule, entity_id))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def key_label(action: str | None, decision: str, rule: str) -> str:
    """The action part of a key: the action, or ``<decision>:<rule>`` for rows without one.

    Holdout rows keep their action so the control group is measured per action.
    """
    return action if action is not None else f"{decision}:{rule}"


def workflow_label(workflow: str) -> str:
    """The action part of a workflow decision's key (which is also its instance id)."""
    return f"workflow:{workflow}"


def step_keys(*, instance_ids: Sequence[str], step: str, attempts: Sequence[int]) -> list[str]:
    """Keys of workflow step attempts: hash(instance, step, attempt), one per instance.

    The instance id already names the insight, partition, entity and workflow, so each attempt of
    each step of each instance has its own key, the same on every re-run.
    """
    base = hashlib.blake2b(SEP.join(("step", step, "")).encode(), digest_size=16)
    keys: list[str] = []
    for instance, attempt in zip(instance_ids, attempts, strict=True):
        hasher = base.copy()
        hasher.update(f"{instance}{SEP}{attempt}".encode())
        keys.append(hasher.hexdigest())
    return keys


def approval_key(*, instance_id: str, step: str, digest: str) -> str:
    """The id of an approval request: hash(instance, step, payload digest).

    A changed payload is a new request with a new id, so no decision carries over to it.
    """
    text = SEP.join(("approval", instance_id, step, digest))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def notify_keys(*, approval_id: str, approvers: Sequence[str]) -> list[str]:
    """Keys of the notifications of one approval request: one per approver, sent once."""
    return [
        hashlib.blake2b(SEP.join(("notify", approval_id, p)).encode(), digest_size=16).hexdigest()
        for p in approvers
    ]
