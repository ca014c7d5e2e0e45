"""The stock-replenishment story's supplier catalogue and live inventory, in one SQLite file.

The replenishment workflow reads the catalogue to choose a supplier (which suppliers offer the SKU,
at what price, how fast, how many they have) and, once a supplier confirms a purchase order,
records it in the inventory. The assortment is :func:`assets.stock.sku_master`'s, so every SKU of
``stock_shortages`` is here, with the same pack size.

Tables (see ``_SCHEMA``):

- ``suppliers``: ``supplier_id``, ``name``, how the supplier's side of the local supplier API
  behaves in the demo (``api_behaviour`` ``confirms``, ``rejects_some`` or ``silent``;
  ``confirm_delay_seconds``; ``reject_rate``) and ``active``.
- ``supplier_items``: one offer per (``supplier_id``, ``sku``): ``unit_price``,
  ``lead_time_days``, ``available_qty``, ``pack_size``. Every SKU has two to six offers. The
  cheapest offer overall is often too slow (Adventure Works ships from overseas), so "the cheapest
  supplier that can deliver within the lead time" is a real choice; and the silent supplier is
  that choice for a share of shortages, so the demo's escalation path happens.
- ``inventory``: ``sku``, ``on_hand``, ``on_order``, ``updated_at``, ``last_po_id``: seeded from
  :func:`assets.stock.generate_inventory` for a day, then updated by the workflow's last step.
- ``inventory_orders``: one row per purchase order applied to ``inventory`` (its ``po_id`` is the
  key), so applying a confirmed order twice changes nothing the second time.

The supplier choice is one query, ``FEASIBLE_OFFERS_SQL``: the offers of a SKU from active
suppliers that deliver within the lead time and have the quantity, cheapest first.

This module imports neither Dagster nor the library (the supplier API's own process opens the
catalogue); the assortment is imported from :mod:`assets.stock` only where a catalogue is generated.
"""

import contextlib
import dataclasses
import datetime as dt
import math
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

__all__ = [
    "FEASIBLE_OFFERS_SQL",
    "SUPPLIERS",
    "SupplierCatalogue",
    "SupplierSpec",
    "cheapest_feasible_offers",
    "generate_catalogue",
]

CATALOGUE_SEED = 31
BEHAVIOURS = ("confirms", "rejects_some", "silent")


@dataclasses.dataclass(frozen=True)
class SupplierSpec:
    """One supplier of the demo: its prices, speed, reach and how its API answers.

    Attributes:
        supplier_id: ``SUP-01`` ...
        name: Company name (fictional).
        api_behaviour: ``confirms`` (confirms nearly everything), ``rejects_some`` (declines a
            good share) or ``silent`` (accepts connections and never answers).
        price_factor: Its prices against each SKU's reference cost.
        lead_time_days: Range (inclusive) its lead times are drawn from.
        coverage: Share of the assortment it offers.
        confirm_delay_seconds: How long after a submission it confirms or declines.
        reject_rate: Share of submitted orders it declines.
    """

    supplier_id: str
    name: str
    api_behaviour: str
    price_factor: float
    lead_time_days: tuple[int, int]
    coverage: float
    confirm_delay_seconds: float
    reject_rate: float


SUPPLIERS = (
    SupplierSpec("SUP-01", "Northwind Wholesale", "confirms", 1.04, (2, 5), 0.7, 1800, 0.02),
    SupplierSpec("SUP-02", "Contoso Distribution", "confirms", 0.98, (4, 9), 0.55, 3600, 0.03),
    SupplierSpec("SUP-03", "Fabrikam Supply", "rejects_some", 0.95, (5, 10), 0.45, 2700, 0.3),
    SupplierSpec("SUP-04", "Tailspin Express", "confirms", 1.12, (1, 3), 0.35, 900, 0.01),
    SupplierSpec("SUP-05", "Litware Trading", "silent", 0.95, (4, 9), 0.25, 0, 0.0),
    SupplierSpec("SUP-06", "Adventure Works Imports", "confirms", 0.86, (12, 24), 0.5, 14400, 0.05),
)
# Item prices scatter around the supplier's factor by this log standard deviation, so which
# supplier is cheapest differs from SKU to SKU.
PRICE_NOISE = 0.05
# An offer's stock at the supplier, in days of the SKU's demand: log-normal around this median;
# a share of offers is nearly sold out (LOW_STOCK_DAYS), too little for a typical order.
STOCK_DAYS_MEDIAN = 90.0
LOW_STOCK_SHARE = 0.07
LOW_STOCK_DAYS = (1.0, 6.0)
MIN_OFFERS = 2

SUPPLIER_COLUMNS = (
    "supplier_id",
    "name",
    "api_behaviour",
    "confirm_delay_seconds",
    "reject_rate",
    "active",
)
ITEM_COLUMNS = ("supplier_id", "sku", "unit_price", "lead_time_days", "available_qty", "pack_size")
INVENTORY_COLUMNS = ("sku", "on_hand", "on_order", "updated_at", "last_po_id")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppliers (
    supplier_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    api_behaviour TEXT NOT NULL,           -- confirms | rejects_some | silent
    confirm_delay_seconds REAL NOT NULL,   -- submission -> confirmation (or rejection)
    reject_rate REAL NOT NULL,             -- share of submitted orders declined
    active INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS supplier_items (
    supplier_id TEXT NOT NULL REFERENCES suppliers (supplier_id),
    sku TEXT NOT NULL,
    unit_price REAL NOT NULL,
    lead_time_days INTEGER NOT NULL,
    available_qty INTEGER NOT NULL,
    pack_size INTEGER NOT NULL,
    PRIMARY KEY (supplier_id, sku)
);
CREATE INDEX IF NOT EXISTS supplier_items_by_sku ON supplier_items (sku, unit_price);
CREATE TABLE IF NOT EXISTS inventory (
    sku TEXT PRIMARY KEY,
    on_hand INTEGER NOT NULL,
    on_order INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    last_po_id TEXT
);
CREATE TABLE IF NOT EXISTS inventory_orders (
    po_id TEXT PRIMARY KEY,
    sku TEXT NOT NULL,
    supplier_id TEXT,
    quantity INTEGER NOT NULL,
    recorded_at TEXT NOT NULL
);
"""

# The supplier choice: offers that arrive within the lead time and cover the quantity, cheapest
# first (ties: faster, then by id, so the choice is deterministic). Named parameters :sku,
# :quantity, :lead_time_days.
FEASIBLE_OFFERS_SQL = """
SELECT i.supplier_id, s.name AS supplier_name, s.api_behaviour, i.sku, i.unit_price,
       i.lead_time_days, i.available_qty, i.pack_size,
       ROUND(i.unit_price * :quantity, 2) AS total
FROM supplier_items AS i JOIN suppliers AS s ON s.supplier_id = i.supplier_id
WHERE i.sku = :sku AND s.active = 1
  AND i.lead_time_days <= :lead_time_days AND i.available_qty >= :quantity
ORDER BY i.unit_price, i.lead_time_days, i.supplier_id
"""


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


def _default_master() -> tuple[pd.DataFrame, np.ndarray]:
    # Imported on first use: assets.stock pulls in Dagster and scikit-learn, which a process that
    # only opens an existing catalogue should not wait for.
    from assets.stock import demand_level, sku_master

    return sku_master(), demand_level()


def generate_catalogue(
    master: pd.DataFrame | None = None,
    demand: np.ndarray | None = None,
    *,
    seed: int = CATALOGUE_SEED,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The suppliers and their offers for an assortment. The same arguments give the same frames.

    Args:
        master: The SKUs (:func:`assets.stock.sku_master`'s columns); the reference assortment
            when None.
        demand: Each SKU's mean daily demand, to scale the suppliers' stock
            (:func:`assets.stock.demand_level`); with ``master`` None, the reference one.
        seed: Identifies the offers.

    Returns:
        (suppliers with ``SUPPLIER_COLUMNS``, offers with ``ITEM_COLUMNS`` sorted by SKU and
        supplier).

    Raises:
        ValueError: ``master`` is given without ``demand``, or their lengths differ.
    """
    if master is None:
        master, demand = _default_master()
    if demand is None or len(demand) != len(master):
        raise ValueError("give each SKU of the master its demand level (assets.stock.demand_level)")
    draw = _rng(seed)
    n, k = len(master), len(SUPPLIERS)
    coverage = np.array([s.coverage for s in SUPPLIERS])
    picks = draw.random((n, k))
    offered = picks < coverage
    # Too few offers: the suppliers that came closest to offering the SKU offer it too.
    closest = np.argsort(picks / coverage, axis=1)[:, :MIN_OFFERS]
    for row in np.flatnonzero(offered.sum(axis=1) < MIN_OFFERS):
        offered[row, closest[row]] = True
    price_noise = draw.normal(0.0, PRICE_NOISE, size=(n, k))
    lead_unit = draw.random((n, k))
    stock_days = STOCK_DAYS_MEDIAN * np.exp(draw.normal(0.0, 0.5, size=(n, k)))
    low = draw.random((n, k)) < LOW_STOCK_SHARE
    low_days = draw.uniform(*LOW_STOCK_DAYS, size=(n, k))

    cost = master["unit_cost"].to_numpy(dtype=float)
    pack = master["pack_size"].to_numpy(dtype=np.int64)
    level = np.asarray(demand, dtype=float)
    rows = []
    for j, spec in enumerate(SUPPLIERS):
        low_lead, high_lead = spec.lead_time_days
        for i in np.flatnonzero(offered[:, j]).tolist():
            days = low_days[i, j] if low[i, j] else stock_days[i, j]
            packs = max(1, math.floor(level[i] * days / pack[i]))
            rows.append(
                {
                    "supplier_id": spec.supplier_id,
                    "sku": str(master["sku"].iat[i]),
                    "unit_price": round(
                        cost[i] * spec.price_factor * math.exp(price_noise[i, j]), 2
                    ),
                    "lead_time_days": low_lead + int(lead_unit[i, j] * (high_lead - low_lead + 1)),
                    "available_qty": int(packs * pack[i]),
                    "pack_size": int(pack[i]),
                }
            )
    items = (
        pd.DataFrame(rows, columns=list(ITEM_COLUMNS))
        .sort_values(["sku", "supplier_id"])
        .reset_index(drop=True)
        .astype({"lead_time_days": "int64", "available_qty": "int64", "pack_size": "int64"})
    )
    suppliers = pd.DataFrame(
        [
            {
                "supplier_id": s.supplier_id,
                "name": s.name,
                "api_behaviour": s.api_behaviour,
                "confirm_delay_seconds": float(s.confirm_delay_seconds),
                "reject_rate": float(s.reject_rate),
                "active": 1,
            }
            for s in SUPPLIERS
        ],
        columns=list(SUPPLIER_COLUMNS),
    )
    return suppliers, items


def cheapest_feasible_offers(shortages: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """For each flagged SKU, the offer ``FEASIBLE_OFFERS_SQL`` would choose, computed in pandas.

    The same rule as the query, over a whole day at once: for backtests, the demo's expectations
    and the tests (which check that the two agree).

    Args:
        shortages: Frame of :func:`assets.stock.find_shortages` (``sku``, ``reorder_qty``,
            ``lead_time_days``, ``flagged``).
        items: The offers (``ITEM_COLUMNS``), of active suppliers only.

    Returns:
        One row per flagged SKU: ``sku``, ``reorder_qty``, ``lead_time_days`` (needed), and the
        chosen ``supplier_id``, ``unit_price``, ``supplier_lead_time_days``, ``total``; the
        offer columns are NaN (``supplier_id`` None) where no offer is feasible.
    """
    flagged = shortages.loc[
        shortages["flagged"].to_numpy(dtype=bool), ["sku", "reorder_qty", "lead_time_days"]
    ]
    offers = flagged.merge(
        items.rename(columns={"lead_time_days": "supplier_lead_time_days"}), on="sku"
    )
    feasible = offers[
        (offers["supplier_lead_time_days"] <= offers["lead_time_days"])
        & (offers["available_qty"] >= offers["reorder_qty"])
    ]
    best = (
        feasible.sort_values(["sku", "unit_price", "supplier_lead_time_days", "supplier_id"])
        .groupby("sku", sort=False)
        .head(1)
    )
    chosen = flagged.merge(
        best[["sku", "supplier_id", "unit_price", "supplier_lead_time_days"]], on="sku", how="left"
    )
    chosen["total"] = (chosen["unit_price"] * chosen["reorder_qty"]).round(2)
    chosen["supplier_id"] = (
        chosen["supplier_id"].astype(object).where(chosen["supplier_id"].notna(), None)
    )
    return chosen.reset_index(drop=True)


class SupplierCatalogue:
    """The catalogue and inventory database: created and seeded by :meth:`create`.

    Every method opens its own short-lived connection, so one object serves threads (a Python
    channel's worker pool) and processes alike; writes run in ``BEGIN IMMEDIATE`` transactions on
    a WAL database, which is what concurrent SQLite writers need (see DESIGN.md).

    Args:
        path: The SQLite file (created by :meth:`create` if missing).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SupplierCatalogue({str(self.path)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def create(
        self,
        *,
        inventory: pd.DataFrame | None = None,
        as_of: dt.date | None = None,
        catalogue: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    ) -> Self:
        """Create the tables and seed whichever are empty; a seeded database is left as it is.

        Args:
            inventory: The snapshot to seed ``inventory`` with (``sku``, ``on_hand``,
                ``on_order``); :func:`assets.stock.generate_inventory` of ``as_of`` when None.
            as_of: The day of the generated snapshot; the first partition when None.
            catalogue: (suppliers, offers) to seed with; :func:`generate_catalogue` when None.

        Returns:
            The catalogue itself.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            # WAL lets a person (or a test) read while the workflow writes.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        if not self._count("suppliers"):
            suppliers, items = catalogue if catalogue is not None else generate_catalogue()
            with self._write() as db:
                db.executemany(
                    f"INSERT INTO suppliers ({', '.join(SUPPLIER_COLUMNS)})"
                    f" VALUES ({', '.join('?' * len(SUPPLIER_COLUMNS))})",
                    _python_rows(suppliers[list(SUPPLIER_COLUMNS)]),
                )
                db.executemany(
                    f"INSERT INTO supplier_items ({', '.join(ITEM_COLUMNS)})"
                    f" VALUES ({', '.join('?' * len(ITEM_COLUMNS))})",
                    _python_rows(items[list(ITEM_COLUMNS)]),
                )
        if not self._count("inventory"):
            if inventory is None:
                from assets.stock import FIRST_DAY, generate_inventory

                inventory = generate_inventory(as_of or FIRST_DAY)
            self.seed_inventory(inventory)
        return self

    def _count(self, table: str) -> int:
        with self._connect() as db:
            return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def seed_inventory(self, snapshot: pd.DataFrame, *, at: dt.datetime | None = None) -> int:
        """Replace the inventory with a snapshot, forgetting the orders applied to the old one.

        Args:
            snapshot: ``sku``, ``on_hand``, ``on_order`` per SKU (as
                :func:`assets.stock.generate_inventory` returns).
            at: ``updated_at`` of every row; now when None.

        Returns:
            The number of SKUs written.
        """
        stamp = _iso(at or _utc_now())
        rows = [
            (str(sku), int(on_hand), int(on_order), stamp)
            for sku, on_hand, on_order in snapshot[["sku", "on_hand", "on_order"]].itertuples(
                index=False, name=None
            )
        ]
        with self._write() as db:
            db.execute("DELETE FROM inventory")
            db.execute("DELETE FROM inventory_orders")
            db.executemany(
                "INSERT INTO inventory (sku, on_hand, on_order, updated_at, last_po_id)"
                " VALUES (?, ?, ?, ?, NULL)",
                rows,
            )
        return len(rows)

    # -- reading -----------------------------------------------------------------------------

    def _frame(
        self, sql: str, parameters: Mapping[str, Any] | tuple[Any, ...] = ()
    ) -> pd.DataFrame:
        with self._connect() as db:
            cursor = db.execute(sql, parameters)
            columns = [c[0] for c in cursor.description]
            return pd.DataFrame([tuple(row) for row in cursor.fetchall()], columns=columns)

    def suppliers(self) -> pd.DataFrame:
        """Every supplier (``SUPPLIER_COLUMNS``), by id."""
        return self._frame(f"SELECT {', '.join(SUPPLIER_COLUMNS)} FROM suppliers ORDER BY 1")

    def items(self, *, active_only: bool = False) -> pd.DataFrame:
        """Every offer (``ITEM_COLUMNS``), by SKU and supplier.

        Args:
            active_only: Only offers of active suppliers.
        """
        where = (
            " WHERE supplier_id IN (SELECT supplier_id FROM suppliers WHERE active = 1)"
            if active_only
            else ""
        )
        return self._frame(
            f"SELECT {', '.join(ITEM_COLUMNS)} FROM supplier_items{where} ORDER BY sku, supplier_id"
        )

    def inventory(self) -> pd.DataFrame:
        """The inventory (``INVENTORY_COLUMNS``), by SKU."""
        return self._frame(f"SELECT {', '.join(INVENTORY_COLUMNS)} FROM inventory ORDER BY sku")

    def inventory_row(self, sku: str) -> dict[str, Any] | None:
        """One SKU's inventory row, or None for a SKU the inventory does not hold."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT {', '.join(INVENTORY_COLUMNS)} FROM inventory WHERE sku = ?", (sku,)
            ).fetchone()
        return None if row is None else dict(row)

    def applied_orders(self) -> pd.DataFrame:
        """The purchase orders applied to the inventory, in the order they were applied."""
        return self._frame("SELECT * FROM inventory_orders ORDER BY rowid")

    def offers(self, sku: str) -> list[dict[str, Any]]:
        """Every offer of a SKU from an active supplier, cheapest first, for a price comparison."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT i.supplier_id, s.name AS supplier_name, s.api_behaviour, i.unit_price,"
                " i.lead_time_days, i.available_qty, i.pack_size"
                " FROM supplier_items AS i JOIN suppliers AS s ON s.supplier_id = i.supplier_id"
                " WHERE i.sku = ? AND s.active = 1"
                " ORDER BY i.unit_price, i.lead_time_days, i.supplier_id",
                (sku,),
            ).fetchall()
        return [dict(row) for row in rows]

    def feasible_offers(self, sku: str, quantity: int, lead_time_days: int) -> list[dict[str, Any]]:
        """The offers that deliver ``quantity`` of ``sku`` within ``lead_time_days``, cheapest
        first (``FEASIBLE_OFFERS_SQL``).

        Returns:
            Rows with ``supplier_id``, ``supplier_name``, ``api_behaviour``, ``sku``,
            ``unit_price``, ``lead_time_days``, ``available_qty``, ``pack_size``, ``total``.
        """
        parameters = {"sku": sku, "quantity": int(quantity), "lead_time_days": int(lead_time_days)}
        with self._connect() as db:
            rows = db.execute(FEASIBLE_OFFERS_SQL, parameters).fetchall()
        return [dict(row) for row in rows]

    def cheapest_feasible_offer(
        self, sku: str, quantity: int, lead_time_days: int
    ) -> dict[str, Any] | None:
        """The first of :meth:`feasible_offers`, or None when no supplier can deliver in time."""
        offers = self.feasible_offers(sku, quantity, lead_time_days)
        return offers[0] if offers else None

    # -- the workflow's last step ------------------------------------------------------------

    def record_purchase_order(
        self,
        *,
        po_id: str,
        sku: str,
        quantity: int,
        supplier_id: str | None = None,
        at: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """Apply a confirmed purchase order to the inventory: ``on_order`` grows by its quantity.

        Idempotent on ``po_id``: the second call for an order changes nothing and says so, so a
        resent step (at-least-once delivery) does not count an order twice.

        Args:
            po_id: The supplier API's id of the order.
            sku: The SKU ordered.
            quantity: Units ordered (> 0).
            supplier_id: The supplier, for the record.
            at: When (``updated_at``); now when None.

        Returns:
            The SKU's inventory row after the call plus ``applied`` (True when this call changed
            it) and ``po_id``: JSON-able, a step's output.

        Raises:
            KeyError: The inventory does not hold the SKU (nothing is recorded).
            ValueError: ``quantity`` is not positive, or ``po_id`` was applied for another SKU or
                quantity.
        """
        if int(quantity) <= 0:
            raise ValueError(f"quantity must be > 0, got {quantity}")
        stamp = _iso(at or _utc_now())
        with self._write() as db:
            known = db.execute(
                "SELECT sku, quantity FROM inventory_orders WHERE po_id = ?", (po_id,)
            ).fetchone()
            if known is not None and (known["sku"], int(known["quantity"])) != (sku, int(quantity)):
                raise ValueError(
                    f"purchase order {po_id} was applied as {known['quantity']} x {known['sku']},"
                    f" not {quantity} x {sku}"
                )
            applied = known is None
            if applied:
                updated = db.execute(
                    "UPDATE inventory SET on_order = on_order + ?, updated_at = ?, last_po_id = ?"
                    " WHERE sku = ?",
                    (int(quantity), stamp, po_id, sku),
                ).rowcount
                if not updated:
                    raise KeyError(f"the inventory holds no SKU {sku!r}")
                db.execute(
                    "INSERT INTO inventory_orders (po_id, sku, supplier_id, quantity, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (po_id, sku, supplier_id, int(quantity), stamp),
                )
            row = db.execute(
                f"SELECT {', '.join(INVENTORY_COLUMNS)} FROM inventory WHERE sku = ?", (sku,)
            ).fetchone()
        if row is None:
            raise KeyError(f"the inventory holds no SKU {sku!r}")
        return {**dict(row), "po_id": po_id, "applied": applied}


def _python_rows(frame: pd.DataFrame) -> Iterator[tuple[Any, ...]]:
    """Rows as tuples of Python values (sqlite3 binds no numpy scalars)."""
    for row in frame.itertuples(index=False, name=None):
        yield tuple(value.item() if isinstance(value, np.generic) else value for value in row)
