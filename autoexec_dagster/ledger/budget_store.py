"""Reserving actions within budgets, atomically across workers (see :mod:`autoexec_dagster.budgets`).

Spending happens in the reservation's own transaction: the (budget, scope) accounts the new rows
touch are locked (a row each in ``autoexec_budget_locks``, inserted if new, then ``SELECT .. FOR
UPDATE`` in sorted order, so two writers wait for each other instead of deadlocking; SQLite's
``BEGIN IMMEDIATE`` already lets one writer in at a time), their spend within each budget's
period is counted, and each new row either spends a unit of every budget that limits it or is
recorded as skipped with the reason. A row whose key already exists spends nothing.
"""

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from autoexec_dagster.budgets import BUDGET_DETAIL, Budget
from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.engine import chunks
from autoexec_dagster.ledger.outbox import Outbox
from autoexec_dagster.ledger.schema import RESERVED, SKIPPED

Account = tuple[str, str]


class BudgetStore(Outbox):
    """The budget half of the ledger: reservation that spends budgets, and their spend."""

    def reserve_within_budgets(
        self, rows: Sequence[Mapping[str, Any]], *, budgets: Sequence[Budget]
    ) -> tuple[list[str], dict[str, str]]:
        """Reserve rows as :meth:`reserve` does, spending the budgets that limit their actions.

        Only new rows in state ``reserved`` spend (the others are recorded as they are). A row
        that would take any of its budgets past ``max_actions`` within the period is recorded
        as ``skipped`` instead, its detail naming the budget.

        Args:
            rows: Action rows, as for :meth:`reserve`.
            budgets: The playbook's budgets.

        Returns:
            The keys inserted by this call, and the keys among them a budget refused, with why.
        """
        if not budgets:
            return self.reserve(rows), {}
        if not rows:
            return [], {}
        with self._write("reserve actions within budgets") as conn:
            existing = self._existing_keys(conn, [row["idempotency_key"] for row in rows])
            charges: list[tuple[int, list[tuple[Budget, str]]]] = []
            for position, row in enumerate(rows):
                if row["state"] != RESERVED or row["idempotency_key"] in existing:
                    continue
                action = str(row.get("action") or "")
                limits = [
                    (budget, _scope(budget, row)) for budget in budgets if budget.limits(action)
                ]
                if limits:
                    charges.append((position, limits))
            if not charges:
                return self._insert_actions(conn, rows), {}
            accounts = sorted({(b.name, scope) for _, limits in charges for b, scope in limits})
            self._lock_accounts(conn, accounts)
            moment = self.clock()
            spent = self._spent(conn, budgets, accounts, moment)
            recorded = list(rows)
            refused: dict[str, str] = {}
            spends: list[dict[str, Any]] = []
            for position, limits in charges:
                row = rows[position]
                full = [(b, s) for b, s in limits if spent.get((b.name, s), 0) >= b.max_actions]
                if full:
                    budget, scope = full[0]
                    detail = (
                        f"{BUDGET_DETAIL} {budget.name} ({budget.describe()}): "
                        f"{spent[(budget.name, scope)]:,} already spent by {budget.per} {scope}"
                    )
                    refused[row["idempotency_key"]] = detail
                    recorded[position] = {**row, "state": SKIPPED, "detail": detail}
                    continue
                for budget, scope in limits:
                    spent[(budget.name, scope)] = spent.get((budget.name, scope), 0) + 1
                    spends.append(
                        {
                            "budget": budget.name,
                            "idempotency_key": row["idempotency_key"],
                            "scope": scope,
                            "playbook": row["playbook"],
                            "action": str(row.get("action") or ""),
                            "spent_at": moment,
                        }
                    )
            for chunk in chunks(spends, 5_000):
                conn.execute(self._insert_ignore(schema.budget_spend), list(chunk))
            inserted = self._insert_actions(conn, recorded)
        ours = set(inserted)
        return inserted, {key: why for key, why in refused.items() if key in ours}

    def budget_spend(self, budget: str, *, since: datetime | None = None) -> dict[str, int]:
        """How many actions each scope (entity or playbook) spent from ``budget``, since a time.

        Args:
            budget: The budget's name.
            since: Count from this moment on (the ledger's clock); everything when None.

        Returns:
            Scope -> actions spent.
        """
        t = schema.budget_spend
        query = sa.select(t.c.scope, sa.func.count()).where(t.c.budget == budget)
        if since is not None:
            query = query.where(t.c.spent_at >= since)
        with self._read("read a budget's spend") as conn:
            return {str(scope): int(n) for scope, n in conn.execute(query.group_by(t.c.scope))}

    def _existing_keys(self, conn: sa.Connection, keys: Sequence[str]) -> set[str]:
        t = schema.actions
        found: set[str] = set()
        for chunk in chunks(keys):
            found.update(
                conn.execute(
                    sa.select(t.c.idempotency_key).where(t.c.idempotency_key.in_(chunk))
                ).scalars()
            )
        return found

    def _lock_accounts(self, conn: sa.Connection, accounts: Sequence[Account]) -> None:
        t = schema.budget_locks
        for chunk in chunks(accounts):
            conn.execute(self._insert_ignore(t), [{"budget": b, "scope": s} for b, s in chunk])
            conn.execute(
                sa.select(t.c.budget)
                .where(sa.tuple_(t.c.budget, t.c.scope).in_(list(chunk)))
                .order_by(t.c.budget, t.c.scope)
                .with_for_update()
            ).all()

    def _spent(
        self,
        conn: sa.Connection,
        budgets: Sequence[Budget],
        accounts: Sequence[Account],
        moment: datetime,
    ) -> dict[Account, int]:
        t = schema.budget_spend
        spent: dict[Account, int] = {}
        for budget in budgets:
            scopes = [scope for name, scope in accounts if name == budget.name]
            for chunk in chunks(scopes):
                query = (
                    sa.select(t.c.scope, sa.func.count())
                    .where(
                        t.c.budget == budget.name,
                        t.c.scope.in_(list(chunk)),
                        t.c.spent_at > moment - budget.window,
                    )
                    .group_by(t.c.scope)
                )
                for scope, n in conn.execute(query):
                    spent[(budget.name, str(scope))] = int(n)
        return spent


def _scope(budget: Budget, row: Mapping[str, Any]) -> str:
    return str(row["entity_id"]) if budget.per == "entity" else str(row["playbook"])
