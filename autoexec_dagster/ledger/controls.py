"""The kill switch: pause a playbook (or every playbook) before its next action."""

import pandas as pd
import sqlalchemy as sa

from autoexec_dagster.ledger import schema
from autoexec_dagster.ledger.engine import LedgerBase, now

ALL = "*"


class Controls(LedgerBase):
    """Pause, resume and ask whether a playbook may run."""

    def pause(self, scope: str = ALL, *, reason: str, by: str) -> None:
        """Stop a playbook (or every playbook, scope ``"*"``) before its next action."""
        self._set_control(scope, paused=True, reason=reason, by=by)

    def resume(self, scope: str = ALL, *, by: str) -> None:
        """Lift a pause set with :meth:`pause`."""
        self._set_control(scope, paused=False, reason=None, by=by)

    def _set_control(self, scope: str, *, paused: bool, reason: str | None, by: str) -> None:
        values = {
            "scope": scope,
            "paused": paused,
            "reason": reason,
            "updated_by": by,
            "updated_at": now(),
        }
        with self._write("set the kill switch") as conn:
            conn.execute(self._upsert(schema.controls, "scope", values))

    def pause_state(self, playbook: str) -> tuple[str, str | None, str | None] | None:
        """``(scope, by, reason)`` of the pause that stops ``playbook``, or None when it may run.

        A global pause (scope ``"*"``) wins over a playbook's own.
        """
        t = schema.controls
        with self._read("read the kill switch") as conn:
            rows = conn.execute(
                sa.select(t.c.scope, t.c.updated_by, t.c.reason).where(
                    t.c.scope.in_([ALL, playbook]), t.c.paused.is_(True)
                )
            ).all()
        if not rows:
            return None
        scope, by, reason = sorted(rows, key=lambda r: r[0] != ALL)[0]
        return str(scope), by, reason

    def pause_reason(self, playbook: str) -> str | None:
        """Why ``playbook`` is paused (globally or by name), or None when it may run."""
        state = self.pause_state(playbook)
        if state is None:
            return None
        scope, by, reason = state
        target = "every playbook" if scope == ALL else f"playbook {scope!r}"
        return f"{target} is paused by {by}: {reason}"

    def controls(self) -> pd.DataFrame:
        """The kill-switch table."""
        with self._read("read the kill switch") as conn:
            return pd.read_sql(sa.select(schema.controls), conn)
