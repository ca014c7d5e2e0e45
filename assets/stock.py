"""The stock-replenishment pipeline of the reference deployment: daily sales, a demand forecast and
daily stock shortages.

About 500 SKUs in six categories sell every day. The numbers are generated, but they behave like a
shop's: each SKU has its own level and trend, its category's weekly pattern (drinks sell on
Fridays and Saturdays, household goods early in the week) and a mild yearly season, planned
promotions (a week every six to ten weeks for most SKUs) lift its sales, and day-to-day sales are
negative-binomial noise around all that. The warehouse replenishes each SKU on its own cycle, so
on any day a few SKUs are running low: those are the shortages the forecast must see coming.

A scikit-learn gradient-boosted regressor forecasts each day's demand over the next two weeks from
what is known at the forecast origin (recent levels, the weekday, planned promotions); its
forecast of demand over a SKU's lead time is measured on held-out weeks against the seasonal-naive
baseline (the same weekday of the last week known), and must beat it.

Which SKUs run short on a day is deterministic: :func:`generate_inventory` gives the warehouse's
snapshot, and ``resources/suppliers.py`` seeds the live inventory table from it and builds the
supplier catalogue for the same SKUs (:func:`sku_master`).

Assets:
    sales_history: daily sales of every SKU over the year before the first partition (not
        partitioned): what the forecast learns from.
    demand_forecast_model: the regressor, evaluated against the seasonal-naive baseline (WAPE,
        MAPE and bias of the lead-time demand, recorded as metadata).
    stock_shortages: one row per SKU per day (daily partitions): on hand, on order, the forecast
        demand over the lead time, the shortfall and the order that would cover it; ``flagged``
        SKUs are the ones the replenishment playbook acts on.

The numbers are tuned together with the replenishment story: of the 500 SKUs about 20-45 are short
on a day, and their orders' estimated values spread across ``APPROVAL_THRESHOLD`` (most below it,
about one in ten above), so most orders go out without a person and some wait for an approval.
The tests pin these shares on the real configuration.
"""

import datetime as dt
import functools
import math
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_limits

PARTITIONS_START = "2026-11-01"
FIRST_DAY = dt.date.fromisoformat(PARTITIONS_START)
N_SKUS = 500
HISTORY_DAYS = 364
# Features look this far back from the forecast origin (eight weeks of weekday history).
LOOKBACK_DAYS = 56
# The longest lead time of any SKU, and so the horizon the model is trained for.
MAX_LEAD_TIME_DAYS = 14
HOLDOUT_DAYS = 28
# Training origins every 12 days: coprime with 7, so every weekday is an origin. Denser origins
# bought nothing (measured: holdout WAPE 0.1487 every 5 days, 0.1490 every 12, in twice the time).
ORIGIN_STRIDE_DAYS = 12
CATALOGUE_SEED = 8
SALES_SEED = 2028
INVENTORY_SEED = 77
# An order brings the position up to the lead-time demand plus this many days of further demand
# plus safety stock (an order-up-to policy), rounded up to whole packs.
ORDER_COVER_DAYS = 14
# Safety stock: this many standard deviations of lead-time demand (about a 95% service level).
SAFETY_Z = 1.65
# The replenishment playbook's approval threshold on an order's value, which the shortages'
# value distribution is tuned against (see the module docstring).
APPROVAL_THRESHOLD = 5_000.0
PREVIEW_ROWS = 10
CURRENCY = "EUR"


@dataclass(frozen=True)
class Category:
    """What the SKUs of a category have in common.

    Costs and demand levels are log-normal around the medians (the second number is the log
    standard deviation); pack sizes and lead times are drawn from the choices.
    """

    weekly: tuple[float, float, float, float, float, float, float]
    unit_cost: tuple[float, float]
    demand: tuple[float, float]
    pack_sizes: tuple[int, ...]
    lead_times: tuple[int, ...]
    yearly_amplitude: float
    products: tuple[str, ...]


CATEGORIES: dict[str, Category] = {
    "beverages": Category(
        weekly=(0.85, 0.85, 0.9, 1.0, 1.2, 1.35, 0.85),
        unit_cost=(5.8, 0.4),
        demand=(22.0, 0.6),
        pack_sizes=(6, 12, 24),
        lead_times=(5, 7),
        yearly_amplitude=0.15,
        products=(
            "Sparkling Water 1L",
            "Cola 330ml x6",
            "Orange Juice 1L",
            "Cold Brew Coffee",
            "Green Tea 500ml",
            "Energy Drink 250ml",
            "Lemonade 1.5L",
            "Oat Milk 1L",
        ),
    ),
    "snacks": Category(
        weekly=(0.9, 0.9, 0.95, 1.0, 1.15, 1.25, 0.85),
        unit_cost=(4.5, 0.4),
        demand=(18.0, 0.6),
        pack_sizes=(12, 24),
        lead_times=(5, 7),
        yearly_amplitude=0.05,
        products=(
            "Sea Salt Crisps",
            "Dark Chocolate Bar",
            "Trail Mix 200g",
            "Oat Cookies",
            "Salted Pretzels",
            "Granola Bar x6",
            "Popcorn 90g",
            "Rice Crackers",
        ),
    ),
    "household": Category(
        weekly=(1.15, 1.05, 1.0, 1.0, 0.95, 1.0, 0.85),
        unit_cost=(11.5, 0.45),
        demand=(9.0, 0.6),
        pack_sizes=(6, 12),
        lead_times=(7, 10),
        yearly_amplitude=0.0,
        products=(
            "Dish Soap 750ml",
            "Laundry Pods x30",
            "Paper Towels x4",
            "Trash Bags 50L",
            "Glass Cleaner",
            "Sponges x6",
            "Toilet Paper x9",
            "Fabric Softener 1L",
        ),
    ),
    "personal_care": Category(
        weekly=(1.05, 1.0, 1.0, 1.0, 1.0, 1.05, 0.9),
        unit_cost=(10.5, 0.45),
        demand=(9.0, 0.6),
        pack_sizes=(6, 12),
        lead_times=(7, 10),
        yearly_amplitude=0.05,
        products=(
            "Shampoo 400ml",
            "Toothpaste 75ml",
            "Body Lotion",
            "Hand Soap 300ml",
            "Deodorant Spray",
            "Sunscreen SPF50",
            "Razor Blades x4",
            "Face Wash",
        ),
    ),
    "pet_supplies": Category(
        weekly=(0.95, 0.95, 0.95, 1.0, 1.05, 1.2, 0.9),
        unit_cost=(27.0, 0.45),
        demand=(5.0, 0.6),
        pack_sizes=(4, 6),
        lead_times=(10, 14),
        yearly_amplitude=0.0,
        products=(
            "Dry Dog Food 3kg",
            "Cat Litter 10L",
            "Wet Cat Food x12",
            "Dog Treats 500g",
            "Bird Seed 2kg",
            "Aquarium Filter",
            "Chew Toy",
            "Cat Food 2kg",
        ),
    ),
    "electronics": Category(
        weekly=(0.85, 0.85, 0.9, 0.95, 1.1, 1.4, 0.95),
        unit_cost=(48.0, 0.5),
        demand=(2.5, 0.6),
        pack_sizes=(1, 5, 10),
        lead_times=(10, 14),
        yearly_amplitude=-0.15,
        products=(
            "USB-C Cable 1m",
            "Wireless Earbuds",
            "Phone Charger 20W",
            "Power Bank 10Ah",
            "HDMI Cable 2m",
            "AA Batteries x8",
            "Bluetooth Speaker",
            "Smart Plug",
        ),
    ),
}
CATEGORY_NAMES = tuple(CATEGORIES)
CATEGORY_SHARES = (0.22, 0.2, 0.17, 0.17, 0.12, 0.12)
_BRANDS = (
    "Alpine", "Brightside", "Cascade", "Daybreak", "Evergreen", "Fieldstone", "Golden Oak",
    "Harbor", "Ironwood", "Juniper", "Kestrel", "Lakeside", "Meadow", "Northstar", "Orchard",
    "Pinecrest", "Quarry", "Riverbend", "Summit", "Timberline",
)  # fmt: skip
# The yearly season peaks mid-July (a negative amplitude: mid-January).
_YEARLY_PEAK_DAY_OF_YEAR = 196

SKU_COLUMNS = ("sku", "product", "category", "unit_cost", "pack_size", "lead_time_days")
SALES_COLUMNS = ("date", "sku", "category", "units_sold", "on_promotion")
INVENTORY_COLUMNS = ("sku", "on_hand", "on_order", "as_of")
SHORTAGE_COLUMNS = (
    "sku",
    "product",
    "category",
    "as_of",
    "on_hand",
    "on_order",
    "lead_time_days",
    "needed_by",
    "forecast_demand",
    "baseline_demand",
    "shortfall",
    "safety_stock",
    "reorder_qty",
    "pack_size",
    "unit_cost",
    "estimated_order_value",
    "days_of_cover",
    "on_promotion_ahead",
    "flagged",
)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


@dataclass(frozen=True)
class _Traits:
    """The hidden parameters of each SKU's demand and replenishment, one array entry per SKU."""

    base: np.ndarray  # units a day at the epoch, before weekday, season and promotions
    growth: np.ndarray  # log growth per year
    weekly: np.ndarray  # (n, 7) weekday factors
    yearly: np.ndarray  # yearly amplitude
    promo_cycle: np.ndarray  # days between promotion starts; 0 = never promoted
    promo_phase: np.ndarray
    promo_days: np.ndarray
    promo_lift: np.ndarray
    dispersion: np.ndarray  # negative-binomial shape: smaller is noisier
    refill_cycle: np.ndarray  # days between the warehouse's refills
    refill_phase: np.ndarray
    refill_gap: np.ndarray  # how many days before the next refill the stock may run short


@functools.cache
def _population(n_skus: int, seed: int) -> tuple[pd.DataFrame, _Traits]:
    draw = _rng(seed)
    category = draw.choice(np.array(CATEGORY_NAMES), size=n_skus, p=CATEGORY_SHARES)
    brand = draw.choice(np.array(_BRANDS), size=n_skus)
    cost_unit = draw.normal(0.0, 1.0, size=n_skus)
    demand_unit = draw.normal(0.0, 1.0, size=n_skus)
    pick_pack = draw.random(n_skus)
    pick_lead = draw.random(n_skus)
    pick_product = draw.random(n_skus)
    weekly_noise = draw.normal(0.0, 0.04, size=(n_skus, 7))
    growth = draw.normal(0.0, 0.15, size=n_skus)
    promoted = draw.random(n_skus) < 0.7
    promo_cycle = np.where(promoted, draw.integers(42, 71, size=n_skus), 0)
    promo_phase = draw.integers(0, 70, size=n_skus)
    promo_days = draw.integers(5, 8, size=n_skus)
    promo_lift = draw.uniform(1.4, 2.2, size=n_skus)
    dispersion = draw.uniform(4.0, 20.0, size=n_skus)
    refill_cycle = draw.integers(21, 43, size=n_skus)
    refill_phase = draw.integers(0, 42, size=n_skus)
    refill_gap = draw.integers(0, 4, size=n_skus)

    rows = []
    base = np.empty(n_skus)
    weekly = np.empty((n_skus, 7))
    yearly = np.empty(n_skus)
    for i, name in enumerate(category):
        spec = CATEGORIES[str(name)]
        unit_cost = spec.unit_cost[0] * math.exp(spec.unit_cost[1] * cost_unit[i])
        base[i] = spec.demand[0] * math.exp(spec.demand[1] * demand_unit[i])
        profile = np.asarray(spec.weekly) * np.exp(weekly_noise[i])
        weekly[i] = profile / profile.mean()
        yearly[i] = spec.yearly_amplitude
        rows.append(
            {
                "sku": f"SKU-{i + 1:04d}",
                "product": f"{brand[i]} {spec.products[int(pick_product[i] * len(spec.products))]}",
                "category": str(name),
                "unit_cost": round(unit_cost, 2),
                "pack_size": spec.pack_sizes[int(pick_pack[i] * len(spec.pack_sizes))],
                "lead_time_days": spec.lead_times[int(pick_lead[i] * len(spec.lead_times))],
            }
        )
    master = pd.DataFrame(rows, columns=list(SKU_COLUMNS)).astype(
        {"sku": "str", "product": "str", "category": "str", "pack_size": "int64"}
    )
    master["lead_time_days"] = master["lead_time_days"].astype("int64")
    traits = _Traits(
        base=base,
        growth=growth,
        weekly=weekly,
        yearly=yearly,
        promo_cycle=promo_cycle,
        promo_phase=promo_phase,
        promo_days=promo_days,
        promo_lift=promo_lift,
        dispersion=dispersion,
        refill_cycle=refill_cycle,
        refill_phase=refill_phase,
        refill_gap=refill_gap,
    )
    return master, traits


def sku_master(n_skus: int = N_SKUS, *, seed: int = CATALOGUE_SEED) -> pd.DataFrame:
    """The SKUs: id (``SKU-0001``), product name, category, reference cost, pack and lead time.

    ``unit_cost`` is the reference cost of one unit (the supplier catalogue's prices scatter
    around it); ``pack_size`` is the case pack every supplier sells the SKU in, so an order is a
    multiple of it; ``lead_time_days`` is how soon a replenishment must arrive, the window the
    forecast covers. The same arguments always give the same frame.

    Args:
        n_skus: Number of SKUs.
        seed: Identifies the assortment (and the demand behind it).

    Returns:
        One row per SKU with the columns of ``SKU_COLUMNS``.

    Raises:
        ValueError: ``n_skus`` is not positive.
    """
    if n_skus <= 0:
        raise ValueError(f"n_skus must be > 0, got {n_skus}")
    return _population(n_skus, seed)[0].copy()


def demand_level(n_skus: int = N_SKUS, *, seed: int = CATALOGUE_SEED) -> np.ndarray:
    """Each SKU's mean daily demand over the four weeks before the first partition.

    A scale for what surrounds the SKU (how much a supplier keeps in stock), not a forecast: it
    includes promotions and no noise.

    Args:
        n_skus: Number of SKUs.
        seed: Identifies the assortment.

    Returns:
        One float per SKU, in :func:`sku_master` order.
    """
    return expected_demand(FIRST_DAY - dt.timedelta(days=28), 28, n_skus, seed=seed).mean(axis=0)


def _days(start: dt.date, days: int) -> np.ndarray:
    return np.arange(start.toordinal(), start.toordinal() + days)


def promotion_calendar(
    start: dt.date, days: int, n_skus: int = N_SKUS, *, seed: int = CATALOGUE_SEED
) -> np.ndarray:
    """Which SKU is on promotion on which day: planned ahead, so known for future days too.

    Args:
        start: The first day.
        days: How many days.
        n_skus: Number of SKUs.
        seed: Identifies the assortment.

    Returns:
        A boolean array (days, n_skus).
    """
    traits = _population(n_skus, seed)[1]
    ordinal = _days(start, days)[:, None]
    cycle = np.where(traits.promo_cycle > 0, traits.promo_cycle, 1)
    running = (ordinal + traits.promo_phase) % cycle < traits.promo_days
    return running & (traits.promo_cycle > 0)


def expected_demand(
    start: dt.date, days: int, n_skus: int = N_SKUS, *, seed: int = CATALOGUE_SEED
) -> np.ndarray:
    """Each SKU's mean demand per day, before noise: level, trend, weekday, season, promotion.

    Args:
        start: The first day.
        days: How many days.
        n_skus: Number of SKUs.
        seed: Identifies the assortment.

    Returns:
        A float array (days, n_skus) of units per day.
    """
    traits = _population(n_skus, seed)[1]
    ordinal = _days(start, days)
    years = (ordinal - FIRST_DAY.toordinal()) / 365.25
    weekday = np.array([dt.date.fromordinal(int(o)).weekday() for o in ordinal])
    day_of_year = np.array([dt.date.fromordinal(int(o)).timetuple().tm_yday for o in ordinal])
    season = np.cos(2.0 * math.pi * (day_of_year - _YEARLY_PEAK_DAY_OF_YEAR) / 365.25)
    promo = promotion_calendar(start, days, n_skus, seed=seed)
    mean = (
        traits.base
        * np.exp(traits.growth * years[:, None])
        * traits.weekly[:, weekday].T
        * (1.0 + traits.yearly * season[:, None])
        * np.where(promo, traits.promo_lift, 1.0)
    )
    return np.asarray(mean, dtype=np.float64)


def sales_matrix(
    start: dt.date,
    days: int,
    n_skus: int = N_SKUS,
    *,
    seed: int = CATALOGUE_SEED,
    sales_seed: int = SALES_SEED,
) -> np.ndarray:
    """Units sold per day and SKU: negative-binomial draws around :func:`expected_demand`.

    Each day's draws come from their own seed (``sales_seed``, the day), so a day's sales are the
    same whichever window they are generated in.

    Args:
        start: The first day.
        days: How many days.
        n_skus: Number of SKUs.
        seed: Identifies the assortment.
        sales_seed: Identifies the sales noise.

    Returns:
        An int64 array (days, n_skus).
    """
    traits = _population(n_skus, seed)[1]
    mean = expected_demand(start, days, n_skus, seed=seed)
    sold = np.empty(mean.shape, dtype=np.int64)
    for row, ordinal in enumerate(_days(start, days)):
        noise = _rng(sales_seed, int(ordinal))
        # Poisson around a gamma-distributed rate: a negative binomial with mean `mean`.
        rate = noise.gamma(traits.dispersion, mean[row] / traits.dispersion)
        sold[row] = noise.poisson(rate)
    return sold


def generate_sales(
    start: dt.date,
    days: int,
    n_skus: int = N_SKUS,
    *,
    seed: int = CATALOGUE_SEED,
    sales_seed: int = SALES_SEED,
) -> pd.DataFrame:
    """Daily sales of every SKU as a long frame, one row per day and SKU (day-major order).

    Args:
        start: The first day.
        days: How many days.
        n_skus: Number of SKUs.
        seed: Identifies the assortment.
        sales_seed: Identifies the sales noise.

    Returns:
        The columns of ``SALES_COLUMNS``: ``date`` (datetime64, midnight), ``sku``,
        ``category``, ``units_sold`` and ``on_promotion``.

    Raises:
        ValueError: ``days`` or ``n_skus`` is not positive.
    """
    if days <= 0:
        raise ValueError(f"days must be > 0, got {days}")
    master = sku_master(n_skus, seed=seed)
    sold = sales_matrix(start, days, n_skus, seed=seed, sales_seed=sales_seed)
    promo = promotion_calendar(start, days, n_skus, seed=seed)
    dates = pd.date_range(pd.Timestamp(start), periods=days, freq="D")
    return pd.DataFrame(
        {
            "date": np.repeat(dates.to_numpy(), n_skus),
            "sku": np.tile(master["sku"].to_numpy(), days),
            "category": np.tile(master["category"].to_numpy(), days),
            "units_sold": sold.reshape(-1),
            "on_promotion": promo.reshape(-1),
        }
    ).astype({"sku": "str", "category": "str"})


def history_start(days: int = HISTORY_DAYS, *, end: dt.date = FIRST_DAY) -> dt.date:
    """The first day of the ``days`` days that end just before ``end``."""
    return end - dt.timedelta(days=days)


def generate_sales_history(
    days: int = HISTORY_DAYS,
    n_skus: int = N_SKUS,
    *,
    seed: int = CATALOGUE_SEED,
    sales_seed: int = SALES_SEED,
) -> pd.DataFrame:
    """The sales of the ``days`` days before the first partition: what the forecast learns from.

    Returns:
        The frame of :func:`generate_sales`.
    """
    return generate_sales(history_start(days), days, n_skus, seed=seed, sales_seed=sales_seed)


def sales_to_matrix(sales: pd.DataFrame) -> tuple[dt.date, np.ndarray, list[str]]:
    """A long sales frame back to (first day, units (days, skus), sku ids in column order).

    Raises:
        ValueError: The frame misses days or SKUs (it must be a full grid).
    """
    wide = sales.pivot(index="date", columns="sku", values="units_sold").sort_index()
    if wide.isna().to_numpy().any():
        raise ValueError("the sales frame is not a full grid of days and SKUs")
    index = pd.DatetimeIndex(wide.index)
    if len(index) > 1 and not (np.diff(index.to_numpy()) == np.timedelta64(1, "D")).all():
        raise ValueError("the sales frame skips days")
    return index[0].date(), wide.to_numpy(dtype=np.int64), [str(c) for c in wide.columns]


def _refill_start(ordinal: int, traits: _Traits) -> np.ndarray:
    """The day each SKU's current refill cycle began (its last refill on or before ``ordinal``)."""
    return ordinal - (ordinal + traits.refill_phase) % traits.refill_cycle


def generate_inventory(
    as_of: dt.date,
    n_skus: int = N_SKUS,
    *,
    seed: int = CATALOGUE_SEED,
    sales_seed: int = SALES_SEED,
    inventory_seed: int = INVENTORY_SEED,
) -> pd.DataFrame:
    """The warehouse's stock at the start of ``as_of``: what is on hand and what is on order.

    The warehouse refills each SKU on a cycle of its own (three to six weeks), up to the demand it
    expects until a little before the following refill would arrive; sales then run the stock
    down day by day. Toward the end of a cycle some SKUs hold less than their lead time's demand:
    the shortages. About one SKU in eight also has an order of its own on the way.

    Args:
        as_of: The day of the snapshot (stock before that day's sales).
        n_skus: Number of SKUs.
        seed: Identifies the assortment.
        sales_seed: Identifies the sales the stock ran down with.
        inventory_seed: Identifies which SKUs have an order on the way.

    Returns:
        One row per SKU with the columns of ``INVENTORY_COLUMNS`` (``as_of`` as ISO text).
    """
    master, traits = _population(n_skus, seed)
    ordinal = as_of.toordinal()
    refilled = _refill_start(ordinal, traits)
    window_start = dt.date.fromordinal(int(refilled.min()))
    span = ordinal - window_start.toordinal()
    lead = master["lead_time_days"].to_numpy()
    horizon = int(traits.refill_cycle.max() + lead.max())
    expected = expected_demand(window_start, span + horizon, n_skus, seed=seed)
    sold = (
        sales_matrix(window_start, span, n_skus, seed=seed, sales_seed=sales_seed)
        if span > 0
        else np.zeros((0, n_skus), dtype=np.int64)
    )
    offset = refilled - window_start.toordinal()
    covered = traits.refill_cycle + lead - traits.refill_gap
    day = np.arange(expected.shape[0])[:, None]
    cumulative = np.vstack([np.zeros((1, n_skus)), np.cumsum(expected, axis=0)])
    cols = np.arange(n_skus)
    refill = cumulative[offset + covered, cols] - cumulative[offset, cols]
    sold_since = np.where((day[:span] >= offset) & (day[:span] < span), sold, 0).sum(axis=0)
    on_hand = np.maximum(np.round(refill) - sold_since, 0).astype(np.int64)

    pending = _rng(inventory_seed, ordinal)
    has_order = pending.random(n_skus) < 0.12
    packs = np.maximum(np.ceil(pending.uniform(0.5, 1.0, n_skus) * traits.base * lead), 1)
    pack = master["pack_size"].to_numpy()
    on_order = np.where(has_order, np.ceil(packs / pack) * pack, 0).astype(np.int64)
    return pd.DataFrame(
        {
            "sku": master["sku"].to_numpy(),
            "on_hand": on_hand,
            "on_order": on_order,
            "as_of": as_of.isoformat(),
        }
    ).astype({"sku": "str", "as_of": "str"})


# -- the forecast ------------------------------------------------------------------------------

FEATURES = (
    "horizon",
    "weekday",
    "category",
    "on_promotion",
    "promo_share_28d",
    "level_7d",
    "level_28d",
    "trend_7_28",
    "weekday_index",
    "same_weekday_last_week",
)


def _one_thread() -> threadpool_limits:
    """Run scikit-learn's native code on one thread (see ``assets.customers._one_thread``)."""
    return threadpool_limits(limits=1)


def _base_level(sold: np.ndarray, promo: np.ndarray, origin: int) -> np.ndarray:
    """Mean daily sales of the 28 days before ``origin`` without promotion days (or with them
    when a SKU was promoted all along), plus a floor so ratios stay finite."""
    window = sold[origin - 28 : origin].astype(float)
    plain = ~promo[origin - 28 : origin]
    counted = plain.sum(axis=0)
    plain_mean = np.where(counted > 0, (window * plain).sum(axis=0) / np.maximum(counted, 1), 0.0)
    return np.where(counted >= 7, plain_mean, window.mean(axis=0)) + 0.25


def _origin_features(
    sold: np.ndarray,
    promo: np.ndarray,
    first_day: dt.date,
    origin: int,
    horizons: int,
    category_codes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of every (horizon, SKU) pair forecast at ``origin``: what is known that morning.

    ``sold`` must hold at least ``LOOKBACK_DAYS`` days before ``origin``; ``promo`` must reach
    ``origin + horizons``. Returns (features (horizons * n, len(FEATURES)), base level per row,
    seasonal-naive forecast per row), horizon-major.
    """
    n = sold.shape[1]
    history = sold[origin - LOOKBACK_DAYS : origin].astype(float)
    level_7 = history[-7:].mean(axis=0)
    level_28 = history[-28:].mean(axis=0)
    base = _base_level(sold, promo, origin)
    promo_share = promo[origin - 28 : origin].mean(axis=0)
    overall = history.mean(axis=0) + 0.25
    blocks = []
    bases = []
    naive = []
    for h in range(horizons):
        target = origin + h
        weekday = (first_day + dt.timedelta(days=target)).weekday()
        # The same weekday in each of the eight weeks before the origin.
        weeks_back = range(h // 7 + 1, h // 7 + 9)
        weekday_rows = sold[[target - 7 * k for k in weeks_back]].astype(float)
        last_same = sold[target - 7 * (h // 7 + 1)].astype(float)
        blocks.append(
            np.column_stack(
                [
                    np.full(n, h, dtype=float),
                    np.full(n, weekday, dtype=float),
                    category_codes.astype(float),
                    promo[target].astype(float),
                    promo_share,
                    level_7,
                    level_28,
                    (level_7 + 0.25) / (level_28 + 0.25),
                    (weekday_rows.mean(axis=0) + 0.25) / overall,
                    last_same,
                ]
            )
        )
        bases.append(base)
        naive.append(last_same)
    return np.vstack(blocks), np.concatenate(bases), np.concatenate(naive)


@dataclass(frozen=True)
class DemandForecastModel:
    """A gradient-boosted regressor of daily demand relative to a SKU's recent base level.

    The regressor predicts, for each day ``h`` days after the forecast origin, the ratio of that
    day's sales to the SKU's base level (its mean daily sales over the last four weeks without
    promotion days), with a Poisson loss weighted by the level: the same fit as a Poisson model
    of the counts with the level as offset, so one model serves SKUs that sell 2 or 200 a day.

    Attributes:
        regressor: The fitted scikit-learn regressor over ``FEATURES``.
        n_skus: The assortment it was trained on (the sales frame's SKUs).
        horizons: The days ahead it forecasts (``MAX_LEAD_TIME_DAYS``).
    """

    regressor: HistGradientBoostingRegressor
    n_skus: int
    horizons: int = MAX_LEAD_TIME_DAYS

    def daily_forecast(
        self,
        sold: np.ndarray,
        promo: np.ndarray,
        first_day: dt.date,
        origin: int,
        category_codes: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Forecast each of the next ``horizons`` days of every SKU, made on the morning of
        ``origin`` (a row index of ``sold``).

        Args:
            sold: Units sold (days, skus), at least ``LOOKBACK_DAYS`` rows before ``origin``.
            promo: The promotion calendar over the same days, reaching ``origin + horizons``.
            first_day: The day of row 0.
            origin: The first forecast day's row.
            category_codes: Each SKU's index in ``CATEGORY_NAMES``.

        Returns:
            (the model's forecast, the seasonal-naive forecast), each (horizons, skus).
        """
        features, base, naive = _origin_features(
            sold, promo, first_day, origin, self.horizons, category_codes
        )
        with _one_thread():
            ratio = self.regressor.predict(features)
        n = sold.shape[1]
        return (ratio * base).reshape(self.horizons, n), naive.reshape(self.horizons, n)


def _category_codes(categories: Any) -> np.ndarray:
    index = {name: i for i, name in enumerate(CATEGORY_NAMES)}
    return np.array([index[str(c)] for c in categories], dtype=np.int64)


def build_demand_regressor(
    max_iter: int = 300, random_state: int = 0
) -> HistGradientBoostingRegressor:
    """An untrained regressor: gradient-boosted trees with a Poisson loss.

    ``category`` and ``weekday`` are categorical features (by position in ``FEATURES``).

    Args:
        max_iter: Boosting iterations (early stopping usually ends sooner).
        random_state: Seed of the early-stopping split, so training is reproducible.
    """
    categorical = [FEATURES.index("weekday"), FEATURES.index("category")]
    return HistGradientBoostingRegressor(
        loss="poisson",
        max_iter=max_iter,
        learning_rate=0.08,
        max_leaf_nodes=31,
        min_samples_leaf=40,
        categorical_features=categorical,  # pyright: ignore[reportArgumentType] - sklearn takes indices
        early_stopping=True,  # pyright: ignore[reportArgumentType] - sklearn takes "auto" or a bool
        random_state=random_state,
    )


def _lead_time_totals(daily: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """Sum of the first ``lead[j]`` days of column ``j`` of a (horizons, skus) array."""
    days = np.arange(daily.shape[0])[:, None]
    return np.where(days < lead[None, :], daily, 0.0).sum(axis=0)


def forecast_errors(forecast: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """WAPE, MAPE and bias of forecasts against actuals.

    WAPE (sum of absolute errors over the sum of actuals) is the headline: it weights SKUs by
    volume and copes with small actuals, where MAPE explodes; MAPE is over actuals above zero.

    Args:
        forecast: Forecast values.
        actual: Actual values, same shape.

    Returns:
        ``wape``, ``mape`` and ``bias`` (sum of errors over the sum of actuals), as fractions.
    """
    forecast = np.asarray(forecast, dtype=float).ravel()
    actual = np.asarray(actual, dtype=float).ravel()
    total = max(float(actual.sum()), 1e-9)
    positive = actual > 0
    mape = (
        float(np.mean(np.abs(forecast[positive] - actual[positive]) / actual[positive]))
        if positive.any()
        else float("nan")
    )
    return {
        "wape": float(np.abs(forecast - actual).sum() / total),
        "mape": mape,
        "bias": float((forecast - actual).sum() / total),
    }


def train_demand_model(
    sales: pd.DataFrame,
    *,
    holdout_days: int = HOLDOUT_DAYS,
    origin_stride_days: int = ORIGIN_STRIDE_DAYS,
    max_iter: int = 300,
    random_state: int = 0,
    seed: int = CATALOGUE_SEED,
) -> tuple[DemandForecastModel, dict[str, Any]]:
    """Train the demand forecast on a sales history and measure it on the history's last weeks.

    Training origins lie before the holdout, far enough that no target day reaches into it. The
    evaluation forecasts, from every origin of the holdout whose lead time it still contains,
    each SKU's demand over its lead time, and compares the model with the seasonal-naive baseline
    (each day forecast as the same weekday of the last week known at the origin).

    Args:
        sales: Frame from :func:`generate_sales_history` (a full grid of days and SKUs).
        holdout_days: The last days of the history, kept for the evaluation.
        origin_stride_days: Days between training origins.
        max_iter: Boosting iterations.
        random_state: Seed of the regressor.
        seed: The assortment the sales come from (for the SKUs' lead times).

    Returns:
        The model fitted on the training origins (the metrics describe exactly the model that is
        returned) and the evaluation: ``wape``, ``mape``, ``bias`` of the model and
        ``baseline_wape``, ``baseline_mape``, ``baseline_bias``, ``wape_improvement`` (1 - model
        / baseline), ``training_rows``, ``evaluation_forecasts``, ``evaluation_origins``,
        ``holdout_start`` and ``holdout_end``.

    Raises:
        ValueError: The history is too short for the lookback, a training origin and the
            holdout.
    """
    first_day, sold, skus = sales_to_matrix(sales)
    n_days, n_skus = sold.shape
    master = sku_master(n_skus, seed=seed)
    categories_sold = sales.drop_duplicates("sku").set_index("sku")["category"]
    if list(master["sku"]) != skus or list(categories_sold[skus]) != list(master["category"]):
        raise ValueError("the sales frame's SKUs are not the assortment of this seed")
    categories = _category_codes(master["category"])
    lead = master["lead_time_days"].to_numpy()
    horizons = MAX_LEAD_TIME_DAYS
    holdout_start = n_days - holdout_days
    last_training_origin = holdout_start - horizons
    if last_training_origin < LOOKBACK_DAYS or holdout_days < horizons:
        raise ValueError(
            f"the history has {n_days} days; it needs at least {LOOKBACK_DAYS} of lookback, "
            f"{horizons} of forecast horizon and a holdout of >= {horizons} days "
            f"({LOOKBACK_DAYS + 2 * horizons + max(holdout_days - horizons, 0)} days here)"
        )
    promo = promotion_calendar(first_day, n_days + horizons, n_skus, seed=seed)
    x_parts, y_parts, w_parts = [], [], []
    for origin in range(last_training_origin, LOOKBACK_DAYS - 1, -origin_stride_days):
        features, base, _ = _origin_features(sold, promo, first_day, origin, horizons, categories)
        actual = sold[origin : origin + horizons].reshape(-1).astype(float)
        x_parts.append(features)
        y_parts.append(actual / base)
        w_parts.append(base)
    x = np.vstack(x_parts)
    with _one_thread():
        regressor = build_demand_regressor(max_iter, random_state).fit(
            x, np.concatenate(y_parts), sample_weight=np.concatenate(w_parts)
        )
    model = DemandForecastModel(regressor=regressor, n_skus=n_skus, horizons=horizons)

    forecasts, baselines, actuals = [], [], []
    origins = range(holdout_start, n_days - horizons + 1)
    for origin in origins:
        daily, naive = model.daily_forecast(sold, promo, first_day, origin, categories)
        actual = sold[origin : origin + horizons].astype(float)
        forecasts.append(_lead_time_totals(daily, lead))
        baselines.append(_lead_time_totals(naive.reshape(horizons, n_skus), lead))
        actuals.append(_lead_time_totals(actual, lead))
    ours = forecast_errors(np.concatenate(forecasts), np.concatenate(actuals))
    baseline = forecast_errors(np.concatenate(baselines), np.concatenate(actuals))
    metrics: dict[str, Any] = {
        **ours,
        **{f"baseline_{name}": value for name, value in baseline.items()},
        "wape_improvement": 1.0 - ours["wape"] / max(baseline["wape"], 1e-9),
        "training_rows": len(x),
        "evaluation_forecasts": len(origins) * n_skus,
        "evaluation_origins": len(origins),
        "holdout_start": (first_day + dt.timedelta(days=holdout_start)).isoformat(),
        "holdout_end": (first_day + dt.timedelta(days=n_days - 1)).isoformat(),
    }
    return model, metrics


# -- the shortages -----------------------------------------------------------------------------


def find_shortages(
    model: DemandForecastModel,
    as_of: dt.date,
    *,
    seed: int = CATALOGUE_SEED,
    sales_seed: int = SALES_SEED,
    inventory_seed: int = INVENTORY_SEED,
) -> pd.DataFrame:
    """The insight of one day: every SKU's stock position against its forecast lead-time demand.

    On the morning of ``as_of`` the model forecasts each SKU's demand over its lead time from the
    sales up to the day before. A SKU is ``flagged`` when that demand exceeds what is on hand plus
    what is on order: it will run out before a new order could arrive. Its ``shortfall`` is the
    difference (whole units); ``reorder_qty`` brings the position up to the lead-time demand plus
    ``ORDER_COVER_DAYS`` more days of it plus safety stock, in whole packs;
    ``estimated_order_value`` prices it at the reference cost. Unflagged SKUs have 0 for all three.

    Args:
        model: Model from :func:`train_demand_model`.
        as_of: The day (the partition).
        seed: The assortment.
        sales_seed: The sales noise.
        inventory_seed: The pending orders of the snapshot.

    Returns:
        One row per SKU with the columns of ``SHORTAGE_COLUMNS``, in SKU order.
    """
    n = model.n_skus
    master = sku_master(n, seed=seed)
    start = as_of - dt.timedelta(days=LOOKBACK_DAYS)
    sold = sales_matrix(start, LOOKBACK_DAYS, n, seed=seed, sales_seed=sales_seed)
    promo = promotion_calendar(start, LOOKBACK_DAYS + model.horizons, n, seed=seed)
    categories = _category_codes(master["category"])
    daily, naive = model.daily_forecast(sold, promo, start, LOOKBACK_DAYS, categories)
    lead = master["lead_time_days"].to_numpy()
    forecast = np.round(_lead_time_totals(daily, lead), 1)
    baseline = np.round(_lead_time_totals(naive, lead), 1)
    inventory = generate_inventory(
        as_of, n, seed=seed, sales_seed=sales_seed, inventory_seed=inventory_seed
    )
    on_hand = inventory["on_hand"].to_numpy()
    on_order = inventory["on_order"].to_numpy()
    position = on_hand + on_order
    flagged = forecast > position
    shortfall = np.where(flagged, np.ceil(forecast - position), 0).astype(np.int64)
    recent = sold[-28:].astype(float)
    safety = np.ceil(SAFETY_Z * recent.std(axis=0) * np.sqrt(lead)).astype(np.int64)
    rate = forecast / lead
    pack = master["pack_size"].to_numpy()
    wanted = shortfall + safety + ORDER_COVER_DAYS * rate
    reorder = np.where(flagged, np.ceil(wanted / pack) * pack, 0).astype(np.int64)
    unit_cost = master["unit_cost"].to_numpy()
    ahead = np.arange(model.horizons)[:, None] < lead[None, :]
    frame = pd.DataFrame(
        {
            "sku": master["sku"],
            "product": master["product"],
            "category": master["category"],
            "as_of": as_of.isoformat(),
            "on_hand": on_hand,
            "on_order": on_order,
            "lead_time_days": lead.astype(np.int64),
            "needed_by": [(as_of + dt.timedelta(days=int(d))).isoformat() for d in lead],
            "forecast_demand": forecast,
            "baseline_demand": baseline,
            "shortfall": shortfall,
            "safety_stock": np.where(flagged, safety, 0).astype(np.int64),
            "reorder_qty": reorder,
            "pack_size": pack.astype(np.int64),
            "unit_cost": unit_cost,
            "estimated_order_value": np.round(reorder * unit_cost, 2),
            "days_of_cover": np.round(np.minimum(position / np.maximum(rate, 1e-9), 999.0), 1),
            "on_promotion_ahead": (
                promo[LOOKBACK_DAYS : LOOKBACK_DAYS + model.horizons] & ahead
            ).any(axis=0),
            "flagged": flagged,
        }
    )
    return frame.reindex(columns=list(SHORTAGE_COLUMNS)).astype(
        {"sku": "str", "product": "str", "category": "str", "as_of": "str", "needed_by": "str"}
    )


def shortage_summary(shortages: pd.DataFrame) -> dict[str, Any]:
    """Metadata of one day's shortages: counts, order values and a preview of the most urgent.

    Bounded whatever the row count. SKUs are not personal data, so the preview names them.

    Args:
        shortages: Frame from :func:`find_shortages`.

    Returns:
        Dagster metadata: row count, ``flagged`` (the count the sensor can read without loading
        the frame), the flagged share, shortfall units, estimated order values (total,
        quantiles, how many reach ``APPROVAL_THRESHOLD``), flagged SKUs per category and a
        preview of the flagged SKUs with the fewest days of cover.
    """
    flagged = shortages[shortages["flagged"].to_numpy(dtype=bool)]
    values = flagged["estimated_order_value"].to_numpy(dtype=float)
    per_category = {name: int((flagged["category"] == name).sum()) for name in CATEGORY_NAMES}
    quantiles = {
        f"p{q}": round(float(np.quantile(values, q / 100)), 2) if len(values) else 0.0
        for q in (10, 50, 90)
    }
    preview_columns = (
        ("sku", "string"),
        ("product", "string"),
        ("category", "string"),
        ("on_hand", "int"),
        ("on_order", "int"),
        ("forecast_demand", "float"),
        ("shortfall", "int"),
        ("reorder_qty", "int"),
        ("estimated_order_value", "float"),
        ("days_of_cover", "float"),
        ("lead_time_days", "int"),
    )
    top = flagged.sort_values(["days_of_cover", "sku"]).head(PREVIEW_ROWS)
    records = [
        dg.TableRecord(
            {
                name: (str(row[name]) if kind == "string" else int(row[name]))
                if kind != "float"
                else float(row[name])
                for name, kind in preview_columns
            }
        )
        for row in top.to_dict("records")
    ]
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in preview_columns])
    rows = len(shortages)
    return {
        "dagster/row_count": dg.MetadataValue.int(rows),
        "flagged": dg.MetadataValue.int(len(flagged)),
        "flagged_fraction": dg.MetadataValue.float(round(len(flagged) / rows, 4) if rows else 0.0),
        "shortfall_units": dg.MetadataValue.int(int(flagged["shortfall"].sum())),
        "estimated_order_value": dg.MetadataValue.float(round(float(values.sum()), 2)),
        "orders_at_or_above_approval_threshold": dg.MetadataValue.int(
            int(np.sum(values >= APPROVAL_THRESHOLD))
        ),
        "approval_threshold": dg.MetadataValue.float(APPROVAL_THRESHOLD),
        "order_value_quantiles": dg.MetadataValue.json(quantiles),
        "flagged_per_category": dg.MetadataValue.json(per_category),
        "currency": dg.MetadataValue.text(CURRENCY),
        "preview": dg.MetadataValue.table(records, schema=schema),
    }


stock_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START)


class SalesHistoryConfig(dg.Config):
    """How much sales history the forecast learns from, and of how many SKUs."""

    days: int = Field(
        default=HISTORY_DAYS,
        ge=LOOKBACK_DAYS + 2 * MAX_LEAD_TIME_DAYS,
        description="Days before the first partition.",
    )
    n_skus: int = Field(default=N_SKUS, ge=1, description="SKUs in the assortment.")


class DemandForecastConfig(dg.Config):
    """How the demand forecast is trained and measured."""

    holdout_days: int = Field(
        default=HOLDOUT_DAYS,
        ge=MAX_LEAD_TIME_DAYS,
        description="The history's last days, kept for the evaluation against the baseline.",
    )
    origin_stride_days: int = Field(
        default=ORIGIN_STRIDE_DAYS, ge=1, description="Days between training origins."
    )
    max_iter: int = Field(default=300, ge=10, description="Boosting iterations at most.")
    random_state: int = Field(default=0, description="Seed of the regressor.")


_SHORTAGE_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("sku", "string", description="Entity key, e.g. SKU-0042."),
        dg.TableColumn("product", "string"),
        dg.TableColumn("category", "string", description=", ".join(CATEGORY_NAMES) + "."),
        dg.TableColumn("as_of", "string", description="The partition day (ISO)."),
        dg.TableColumn("on_hand", "int", description="Units in the warehouse that morning."),
        dg.TableColumn("on_order", "int", description="Units ordered, not yet received."),
        dg.TableColumn("lead_time_days", "int", description="How soon an order must arrive."),
        dg.TableColumn("needed_by", "string", description="as_of + lead_time_days (ISO)."),
        dg.TableColumn(
            "forecast_demand", "float", description="Forecast units over the lead time."
        ),
        dg.TableColumn(
            "baseline_demand", "float", description="Seasonal-naive forecast, same span."
        ),
        dg.TableColumn("shortfall", "int", description="forecast - on hand - on order; 0 if none."),
        dg.TableColumn("safety_stock", "int", description="Units against forecast error."),
        dg.TableColumn("reorder_qty", "int", description="Units to order, whole packs; 0 if none."),
        dg.TableColumn("pack_size", "int", description="Units per case; orders are multiples."),
        dg.TableColumn("unit_cost", "float", description=f"Reference cost per unit, {CURRENCY}."),
        dg.TableColumn("estimated_order_value", "float", description="reorder_qty * unit_cost."),
        dg.TableColumn("days_of_cover", "float", description="(on hand + on order) / daily rate."),
        dg.TableColumn("on_promotion_ahead", "bool", description="A promotion within lead time."),
        dg.TableColumn("flagged", "bool", description="forecast_demand > on hand + on order."),
    ]
)


@dg.asset(group_name="stock", kinds={"pandas"})
def sales_history(config: SalesHistoryConfig) -> dg.MaterializeResult[pd.DataFrame]:
    """Daily sales of every SKU over the days before the first partition."""
    sales = generate_sales_history(config.days, config.n_skus)
    daily_units = sales.groupby("date")["units_sold"].sum()
    return dg.MaterializeResult(
        value=sales,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(sales)),
            "skus": dg.MetadataValue.int(config.n_skus),
            "first_day": dg.MetadataValue.text(history_start(config.days).isoformat()),
            "last_day": dg.MetadataValue.text((FIRST_DAY - dt.timedelta(days=1)).isoformat()),
            "mean_units_per_day": dg.MetadataValue.float(round(float(daily_units.mean()), 1)),
            "promotion_share": dg.MetadataValue.float(
                round(float(sales["on_promotion"].mean()), 4)
            ),
        },
    )


@dg.asset(group_name="stock", kinds={"scikitlearn"})
def demand_forecast_model(
    config: DemandForecastConfig, sales_history: pd.DataFrame
) -> dg.MaterializeResult[DemandForecastModel]:
    """Gradient-boosted daily demand forecast, measured over lead times against seasonal naive."""
    model, metrics = train_demand_model(
        sales_history,
        holdout_days=config.holdout_days,
        origin_stride_days=config.origin_stride_days,
        max_iter=config.max_iter,
        random_state=config.random_state,
    )
    return dg.MaterializeResult(
        value=model,
        metadata={
            "wape": dg.MetadataValue.float(round(metrics["wape"], 4)),
            "mape": dg.MetadataValue.float(round(metrics["mape"], 4)),
            "bias": dg.MetadataValue.float(round(metrics["bias"], 4)),
            "baseline_wape": dg.MetadataValue.float(round(metrics["baseline_wape"], 4)),
            "baseline_mape": dg.MetadataValue.float(round(metrics["baseline_mape"], 4)),
            "baseline_bias": dg.MetadataValue.float(round(metrics["baseline_bias"], 4)),
            "wape_improvement": dg.MetadataValue.float(round(metrics["wape_improvement"], 4)),
            "beats_baseline": dg.MetadataValue.bool(
                metrics["wape"] < metrics["baseline_wape"]
                and metrics["mape"] < metrics["baseline_mape"]
            ),
            "baseline": dg.MetadataValue.text("seasonal naive: the same weekday of the last week"),
            "evaluated_on": dg.MetadataValue.text(
                f"demand over each SKU's lead time from {metrics['evaluation_origins']} origins, "
                f"{metrics['holdout_start']} .. {metrics['holdout_end']}"
            ),
            "evaluation_forecasts": dg.MetadataValue.int(metrics["evaluation_forecasts"]),
            "training_rows": dg.MetadataValue.int(metrics["training_rows"]),
            "horizon_days": dg.MetadataValue.int(model.horizons),
            "features": dg.MetadataValue.json(list(FEATURES)),
        },
    )


@dg.asset(
    group_name="stock",
    kinds={"pandas", "scikitlearn"},
    partitions_def=stock_partitions,
    metadata={"dagster/column_schema": _SHORTAGE_SCHEMA},
)
def stock_shortages(
    context: dg.AssetExecutionContext, demand_forecast_model: DemandForecastModel
) -> dg.MaterializeResult[pd.DataFrame]:
    """Every SKU's stock against its forecast lead-time demand: the insight the replenishment
    playbook acts on (``flagged``)."""
    shortages = find_shortages(demand_forecast_model, dt.date.fromisoformat(context.partition_key))
    return dg.MaterializeResult(value=shortages, metadata=shortage_summary(shortages))
