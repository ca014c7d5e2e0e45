"""The stock-replenishment workflow's decisions: pure functions over every instance at a step.

Two transform steps of ``resources/stock_playbook.yaml`` name these functions
(``transform: resources.stock_rules:cheapest_in_time``). Each gets one DataFrame: an
``instance_id`` column, the shortage's insight columns (``sku``, ``reorder_qty``,
``lead_time_days``, ...) and the earlier steps' outputs as ``<step>.<field>`` columns. Each
returns ``instance_id`` and the columns it adds; a row whose only value is a ``reason`` fails the
instance with that reason, and the workflow escalates it with its evidence.

- :func:`cheapest_in_time` chooses, per shortage, the cheapest supplier whose offer arrives within
  the SKU's lead time and covers the order (the ``quotes`` step's rows are every active offer of
  the SKU). A shortage that no offer covers in time fails: "no supplier can deliver in time".
- :func:`confirmed_by_supplier` lets an order the supplier confirmed go on to the inventory and
  fails one it rejected, with the supplier's reason, at once (a poll that waited for
  ``confirmed`` alone would wait out its three-day timeout for an answer that has come).

They are vectorised (one frame for every instance at the step) and deterministic: ties go to the
faster offer, then to the lower supplier id, exactly as ``resources.suppliers.FEASIBLE_OFFERS_SQL``
orders them, so the choice agrees with :func:`resources.suppliers.cheapest_feasible_offers`.
"""

import math
from typing import Any

import pandas as pd

__all__ = [
    "CHOICE_COLUMNS",
    "cheapest_in_time",
    "confirmed_by_supplier",
]

INSTANCE = "instance_id"
QUOTES = "quotes.rows"
# What the choose step adds (its output); later steps read them as `choose.<column>`.
CHOICE_COLUMNS = (
    "supplier_id",
    "supplier_name",
    "unit_price",
    "supplier_lead_time_days",
    "quantity",
    "expected_total",
    "offers",
    "offers_in_time",
    "passed_over",
    "reason",
)
# At most this many cheaper offers are named in `passed_over`: enough for the approver's email.
PASSED_OVER_SHOWN = 3


def _offers(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (instance, offer) from the quotes step's rows."""
    rows = [
        {
            INSTANCE: instance_id,
            "needed_qty": int(quantity),
            "needed_days": int(lead_time),
            **offer,
        }
        for instance_id, quantity, lead_time, quotes in zip(
            frame[INSTANCE],
            frame["reorder_qty"],
            frame["lead_time_days"],
            frame[QUOTES],
            strict=True,
        )
        for offer in (quotes if isinstance(quotes, list) else [])
        if isinstance(offer, dict)
    ]
    columns = [
        INSTANCE,
        "needed_qty",
        "needed_days",
        "supplier_id",
        "supplier_name",
        "unit_price",
        "lead_time_days",
        "available_qty",
    ]
    offers = pd.DataFrame(rows)
    for column in columns:
        if column not in offers.columns:
            offers[column] = pd.Series(dtype=object)
    offers = offers[columns]
    offers["in_time"] = offers["lead_time_days"].astype(float) <= offers["needed_days"]
    offers["enough"] = offers["available_qty"].astype(float) >= offers["needed_qty"]
    return offers.sort_values(
        [INSTANCE, "unit_price", "lead_time_days", "supplier_id"], kind="stable"
    ).reset_index(drop=True)


def _why_not(offer: pd.Series) -> str:
    """Why one offer cannot be taken, in words for the approver and the escalation."""
    problems = []
    if not offer["in_time"]:
        problems.append(f"{int(offer['lead_time_days'])} days, too slow")
    if not offer["enough"]:
        problems.append(f"only {int(offer['available_qty']):,} available")
    return (
        f"{offer['supplier_id']} {offer['supplier_name']} at {float(offer['unit_price']):.2f} "
        f"({'; '.join(problems)})"
    )


def cheapest_in_time(frame: pd.DataFrame) -> pd.DataFrame:
    """The cheapest supplier per shortage that delivers the order within the lead time.

    Args:
        frame: One row per instance: ``instance_id``, ``reorder_qty`` (units to order),
            ``lead_time_days`` (how soon the order must arrive) and ``quotes.rows`` (the offers:
            ``supplier_id``, ``supplier_name``, ``unit_price``, ``lead_time_days``,
            ``available_qty``).

    Returns:
        One row per instance with :data:`CHOICE_COLUMNS`: the chosen supplier, its price and
        lead time, the quantity and ``expected_total`` (price x quantity), how many offers there
        were and how many arrive in time, and ``passed_over``: the cheaper offers that could not
        be taken and why. Where no offer covers the order in time, only ``reason`` is set, which
        fails the instance with it.
    """
    offers = _offers(frame)
    feasible = offers[offers["in_time"] & offers["enough"]]
    best = feasible.groupby(INSTANCE, sort=False).head(1).set_index(INSTANCE)
    counts = offers.groupby(INSTANCE).size()
    in_time = offers[offers["in_time"]].groupby(INSTANCE).size()
    by_instance = {str(k): g for k, g in offers.groupby(INSTANCE, sort=False)}
    rows: list[dict[str, Any]] = []
    for instance_id, quantity, lead_time in zip(
        frame[INSTANCE], frame["reorder_qty"], frame["lead_time_days"], strict=True
    ):
        mine = by_instance.get(str(instance_id), offers.iloc[0:0])
        if instance_id not in best.index:
            tried = "; ".join(_why_not(o) for _, o in mine.iterrows()) or "no supplier offers it"
            rows.append(
                {
                    INSTANCE: instance_id,
                    "reason": (
                        f"no supplier can deliver {int(quantity):,} units within "
                        f"{int(lead_time)} days: {tried}"
                    ),
                }
            )
            continue
        chosen = best.loc[instance_id]
        price = float(chosen["unit_price"])
        cheaper = mine[mine["unit_price"] < price]
        rows.append(
            {
                INSTANCE: instance_id,
                "supplier_id": str(chosen["supplier_id"]),
                "supplier_name": str(chosen["supplier_name"]),
                "unit_price": price,
                "supplier_lead_time_days": int(chosen["lead_time_days"]),
                "quantity": int(quantity),
                "expected_total": round(price * int(quantity), 2),
                "offers": int(counts.get(instance_id, 0)),
                "offers_in_time": int(in_time.get(instance_id, 0)),
                "passed_over": "; ".join(
                    _why_not(o) for _, o in cheaper.head(PASSED_OVER_SHOWN).iterrows()
                ),
                "reason": None,
            }
        )
    result = pd.DataFrame(rows, columns=[INSTANCE, *CHOICE_COLUMNS])
    return result.astype({"offers": "Int64", "offers_in_time": "Int64", "quantity": "Int64"})


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def confirmed_by_supplier(frame: pd.DataFrame) -> pd.DataFrame:
    """Orders their supplier confirmed go on; orders it rejected fail with its reason.

    Args:
        frame: One row per instance with the ``confirm`` poll's last reply: ``confirm.status``
            (``confirmed`` or ``rejected``), ``confirm.po_id``, ``confirm.supplier_name``,
            ``confirm.reason``, ``confirm.confirmed_at``, ``confirm.expected_delivery``.

    Returns:
        For a confirmed order: ``po_id``, ``confirmed_at`` and ``expected_delivery``. For any
        other status only a ``reason`` (the supplier's, for a rejection), which fails the
        instance so the workflow escalates it with the order's history.
    """
    status = frame["confirm.status"].astype(str).to_numpy()
    confirmed = status == "confirmed"

    def column(name: str) -> list[str | None]:
        values = frame[name] if name in frame.columns else pd.Series([None] * len(frame))
        return [_text(v) for v in values]

    po_ids, suppliers = column("confirm.po_id"), column("confirm.supplier_name")
    reasons = column("confirm.reason")
    failed = [
        None
        if ok
        else f"{supplier or 'the supplier'} rejected {po or 'the order'}: "
        f"{reason or 'no reason given'}"
        if s == "rejected"
        else f"{po or 'the order'} is {s} at {supplier or 'the supplier'}, neither confirmed "
        "nor rejected"
        for ok, s, po, supplier, reason in zip(
            confirmed, status, po_ids, suppliers, reasons, strict=True
        )
    ]

    def kept(values: list[str | None]) -> list[str | None]:
        return [v if ok else None for ok, v in zip(confirmed, values, strict=True)]

    return pd.DataFrame(
        {
            INSTANCE: frame[INSTANCE].to_numpy(),
            "po_id": kept(po_ids),
            "confirmed_at": kept(column("confirm.confirmed_at")),
            "expected_delivery": kept(column("confirm.expected_delivery")),
            "reason": failed,
        }
    )
