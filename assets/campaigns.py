"""The campaign-optimisation pipeline of the reference deployment: daily email-campaign metrics, the
click insight that flags weak campaigns, the recipients of their next sends and the outcomes the
tracking endpoint recorded.

About 80 email campaigns in four segments send every day. The numbers are generated but behave
like a mailing team's: each campaign has its own list size and its own true click rate around
its segment's (loyal subscribers click more than lapsed ones), a few campaigns are plainly weak
(stale content), and each day's sends, opens, clicks and unsubscribes are binomial noise around
that. The insight compares each campaign's click rate with its segment's benchmark, the median of
the segment that day, and flags those below ``UNDERPERFORMING_RATIO`` of it: the campaigns whose
next sends the optimisation loop tests variants on.

Assets (all partitioned by day from ``PARTITIONS_START``):
    campaign_metrics: one row per campaign: sends, opens, clicks, unsubscribes of the day.
    campaign_click_insight: one row per campaign: click rate, the segment's benchmark, their
        ratio and ``underperforming``; the count is recorded as metadata.
    campaign_sends: the recipients of the next send of every flagged campaign, one row per
        recipient (``recipient_id``, ``email``, ``name``, ``campaign_id``, ``campaign_name``,
        ``segment``, ``flagged``): the insight the ``campaign_optimisation`` playbook acts on. A
        recipient is in one send only (each day's send reaches the next slice of the list).
    campaign_outcomes: what the recipients did, as the tracking endpoint
        (:mod:`resources.tracking_server`) recorded it on the day: one row per event
        (``recipient_id``, ``occurred_at`` in UTC, ``opened``, ``clicked``, ``unsubscribed``,
        each 0/1); the outcomes the experiment is judged by.

Addresses are on the RFC 2606 documentation domains (``example.com``, ``.org``, ``.net``).
"""

import datetime as dt
import functools
import hashlib
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

PARTITIONS_START = "2026-11-01"
FIRST_DAY = dt.date.fromisoformat(PARTITIONS_START)
N_CAMPAIGNS = 80
CAMPAIGN_SEED = 11
METRICS_SEED = 2026
# A campaign is underperforming below this share of its segment's benchmark click rate.
UNDERPERFORMING_RATIO = 0.8
# Recipients of one campaign's next send (about 20 flagged campaigns: ~1,250 emails a day).
SEND_SIZE = 60
PREVIEW_ROWS = 10
PLAYBOOK_NAME = "campaign_optimisation"
# The execution layer's actions asset, which the outcomes follow in the lineage.
ACTIONS_KEY = dg.AssetKey([PLAYBOOK_NAME, "actions"])
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")


@dataclass(frozen=True)
class Segment:
    """What the campaigns of a segment have in common: typical rates and list sizes."""

    click_rate: float
    open_rate: float
    unsubscribe_rate: float
    daily_sends: tuple[int, int]
    themes: tuple[str, ...]


SEGMENTS: dict[str, Segment] = {
    "new_subscribers": Segment(
        click_rate=0.040,
        open_rate=0.32,
        unsubscribe_rate=0.004,
        daily_sends=(1_500, 4_000),
        themes=("Welcome Series", "Getting Started", "First Order Tips", "Starter Picks"),
    ),
    "regulars": Segment(
        click_rate=0.034,
        open_rate=0.26,
        unsubscribe_rate=0.002,
        daily_sends=(3_000, 8_000),
        themes=("Weekly Picks", "New Arrivals", "Staff Favourites", "Weekend Reads"),
    ),
    "lapsed": Segment(
        click_rate=0.018,
        open_rate=0.15,
        unsubscribe_rate=0.006,
        daily_sends=(2_000, 6_000),
        themes=("We Miss You", "Come Back", "What You Missed", "Still Interested"),
    ),
    "vip": Segment(
        click_rate=0.055,
        open_rate=0.42,
        unsubscribe_rate=0.001,
        daily_sends=(500, 1_500),
        themes=("Early Access", "Members Only", "Private Sale", "Insider Preview"),
    ),
}
SEGMENT_NAMES = tuple(SEGMENTS)
_SEASONS = ("Autumn", "Winter", "Holiday", "Cosy", "Fresh", "Classic", "Bright", "Evening")
_FIRST_NAMES = (
    "Ada", "Ben", "Chloe", "Dev", "Elif", "Farah", "Gus", "Hana", "Ivo", "Jade", "Kofi", "Lena",
    "Milo", "Nia", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tess", "Uma", "Vik", "Wren", "Yara",
)  # fmt: skip
_LAST_NAMES = (
    "Adler", "Brooks", "Costa", "Dalton", "Evans", "Fischer", "Garcia", "Hughes", "Ito", "Jensen",
    "Kowalski", "Larsen", "Moreau", "Novak", "Okafor", "Petrov", "Quist", "Rossi", "Sato",
    "Tanaka", "Usman", "Vargas", "Weber", "Young",
)  # fmt: skip
# The share of campaigns that are plainly weak, and how much of their segment's rate they reach.
_WEAK_SHARE = 0.15
_WEAK_FACTOR = (0.45, 0.7)
# Log-normal spread of the other campaigns' click rates around their segment's.
_QUALITY_SD = 0.12

METRIC_COLUMNS = (
    "date",
    "campaign_id",
    "campaign_name",
    "segment",
    "sends",
    "opens",
    "clicks",
    "unsubscribes",
)
INSIGHT_COLUMNS = (
    "date",
    "campaign_id",
    "campaign_name",
    "segment",
    "sends",
    "clicks",
    "click_rate",
    "segment_benchmark",
    "benchmark_ratio",
    "underperforming",
)
SEND_COLUMNS = (
    "recipient_id",
    "email",
    "name",
    "campaign_id",
    "campaign_name",
    "segment",
    "flagged",
)
OUTCOME_COLUMNS = ("recipient_id", "occurred_at", "opened", "clicked", "unsubscribed")
# What the tracking endpoint records per event kind, as outcome columns: a click or an
# unsubscribe needs the email open, so it counts as an open too.
_EVENT_FLAGS = {
    "open": (1, 0, 0),
    "click": (1, 1, 0),
    "unsubscribe": (1, 0, 1),
}


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@functools.cache
def _campaigns(n_campaigns: int, seed: int) -> pd.DataFrame:
    draw = _rng(seed)
    segment = np.array(SEGMENT_NAMES)[np.arange(n_campaigns) % len(SEGMENT_NAMES)]
    weak = draw.random(n_campaigns) < _WEAK_SHARE
    quality = np.where(
        weak,
        draw.uniform(*_WEAK_FACTOR, size=n_campaigns),
        np.exp(draw.normal(0.0, _QUALITY_SD, size=n_campaigns)),
    )
    size_pick = draw.random(n_campaigns)
    theme_pick = draw.integers(0, 1_000, size=n_campaigns)
    season_pick = draw.integers(0, len(_SEASONS), size=n_campaigns)
    rows = []
    for i in range(n_campaigns):
        spec = SEGMENTS[str(segment[i])]
        low, high = spec.daily_sends
        rows.append(
            {
                "campaign_id": f"CMP-{i + 1:03d}",
                "campaign_name": (
                    f"{_SEASONS[int(season_pick[i])]} {spec.themes[int(theme_pick[i]) % 4]}"
                ),
                "segment": str(segment[i]),
                "true_click_rate": spec.click_rate * float(quality[i]),
                "open_rate": spec.open_rate,
                "unsubscribe_rate": spec.unsubscribe_rate,
                "daily_sends": int(low + size_pick[i] * (high - low)),
            }
        )
    return pd.DataFrame(rows)


def campaign_catalogue(
    n_campaigns: int = N_CAMPAIGNS, *, seed: int = CAMPAIGN_SEED
) -> pd.DataFrame:
    """The campaigns: id (``CMP-001``), name, segment, and the hidden truth behind their metrics.

    Args:
        n_campaigns: Number of campaigns (spread evenly over the segments).
        seed: Identifies the campaigns.

    Returns:
        One row per campaign: ``campaign_id``, ``campaign_name``, ``segment``,
        ``true_click_rate`` (clicks per send), ``open_rate``, ``unsubscribe_rate`` and
        ``daily_sends`` (the typical day's sends). The same arguments give the same frame.

    Raises:
        ValueError: ``n_campaigns`` is not positive.
    """
    if n_campaigns <= 0:
        raise ValueError(f"n_campaigns must be > 0, got {n_campaigns}")
    return _campaigns(n_campaigns, seed).copy()


def generate_campaign_metrics(
    day: dt.date,
    n_campaigns: int = N_CAMPAIGNS,
    *,
    seed: int = CAMPAIGN_SEED,
    metrics_seed: int = METRICS_SEED,
) -> pd.DataFrame:
    """One day's metrics of every campaign: sends, opens, clicks and unsubscribes.

    Sends scatter around the campaign's typical day (Poisson); opens are binomial over the sends,
    clicks and unsubscribes binomial over the opens, so a campaign's click rate is its true one
    plus the day's noise.

    Args:
        day: The day.
        n_campaigns: Number of campaigns.
        seed: Identifies the campaigns.
        metrics_seed: The day-to-day noise.

    Returns:
        One row per campaign with the columns of ``METRIC_COLUMNS``, in campaign order.
    """
    campaigns = _campaigns(n_campaigns, seed)
    draw = _rng(metrics_seed, seed, day.toordinal())
    sends = draw.poisson(campaigns["daily_sends"].to_numpy()).astype(np.int64)
    opens = draw.binomial(sends, campaigns["open_rate"].to_numpy())
    click_given_open = campaigns["true_click_rate"] / campaigns["open_rate"]
    clicks = draw.binomial(opens, click_given_open.to_numpy())
    unsubscribes = draw.binomial(opens, campaigns["unsubscribe_rate"].to_numpy())
    return pd.DataFrame(
        {
            "date": day.isoformat(),
            "campaign_id": campaigns["campaign_id"],
            "campaign_name": campaigns["campaign_name"],
            "segment": campaigns["segment"],
            "sends": sends,
            "opens": opens.astype(np.int64),
            "clicks": clicks.astype(np.int64),
            "unsubscribes": unsubscribes.astype(np.int64),
        },
        columns=list(METRIC_COLUMNS),
    )


def click_insight(metrics: pd.DataFrame, *, ratio: float = UNDERPERFORMING_RATIO) -> pd.DataFrame:
    """Each campaign's click rate against its segment's benchmark (the segment's median).

    Args:
        metrics: Frame from :func:`generate_campaign_metrics`.
        ratio: A campaign below ``ratio`` times its benchmark is ``underperforming``.

    Returns:
        One row per campaign with the columns of ``INSIGHT_COLUMNS``, in the metrics' order.
        ``click_rate`` is clicks per send (0 without sends); ``benchmark_ratio`` is the rate
        over the benchmark (0 when the benchmark is 0).
    """
    sends = metrics["sends"].to_numpy(dtype=float)
    clicks = metrics["clicks"].to_numpy(dtype=float)
    rate = np.divide(clicks, sends, out=np.zeros_like(clicks), where=sends > 0)
    frame = metrics[["date", "campaign_id", "campaign_name", "segment", "sends", "clicks"]].copy()
    frame["click_rate"] = rate
    frame["segment_benchmark"] = frame.groupby("segment")["click_rate"].transform("median")
    benchmark = frame["segment_benchmark"].to_numpy(dtype=float)
    frame["benchmark_ratio"] = np.divide(
        rate, benchmark, out=np.zeros_like(rate), where=benchmark > 0
    )
    frame["underperforming"] = rate < ratio * benchmark
    return frame.reindex(columns=list(INSIGHT_COLUMNS))


def _name(key: str) -> tuple[str, str]:
    pick = _stable(key)
    return _FIRST_NAMES[pick % len(_FIRST_NAMES)], _LAST_NAMES[(pick >> 16) % len(_LAST_NAMES)]


def next_sends(insight: pd.DataFrame, day: dt.date, *, send_size: int = SEND_SIZE) -> pd.DataFrame:
    """The recipients of the next send of every underperforming campaign.

    Each day's send reaches the next ``send_size`` subscribers of the campaign's list, so a
    recipient is in one send only and keeps one id (``CMP-017-D003-042``: campaign, day index
    since ``FIRST_DAY``, position).

    Args:
        insight: Frame from :func:`click_insight`.
        day: The day of the send (the partition).
        send_size: Recipients per campaign.

    Returns:
        One row per recipient with the columns of ``SEND_COLUMNS``, campaign by campaign;
        ``flagged`` is True on every row (only flagged campaigns send here).
    """
    flagged = insight[insight["underperforming"].to_numpy(dtype=bool)]
    day_index = (day - FIRST_DAY).days
    rows: list[dict[str, Any]] = []
    for campaign in flagged.to_dict("records"):
        for position in range(send_size):
            recipient = f"{campaign['campaign_id']}-D{day_index:03d}-{position:03d}"
            first, last = _name(recipient)
            domain = EMAIL_DOMAINS[_stable(recipient + "@") % len(EMAIL_DOMAINS)]
            rows.append(
                {
                    "recipient_id": recipient,
                    "email": f"{first}.{last}.{_stable(recipient) % 100_000:05d}@{domain}".lower(),
                    "name": f"{first} {last}",
                    "campaign_id": campaign["campaign_id"],
                    "campaign_name": campaign["campaign_name"],
                    "segment": campaign["segment"],
                    "flagged": True,
                }
            )
    return pd.DataFrame(rows, columns=list(SEND_COLUMNS)).astype(
        {column: "str" for column in SEND_COLUMNS if column != "flagged"} | {"flagged": "bool"}
    )


def read_outcomes(tracking_db: str | Path, day: dt.date) -> pd.DataFrame:
    """The events the tracking endpoint recorded on ``day`` (UTC), as outcome rows.

    Args:
        tracking_db: The tracking endpoint's SQLite file (its ``events`` table); a missing file
            means no events yet.
        day: The day.

    Returns:
        One row per recipient and event time with the columns of ``OUTCOME_COLUMNS``, in time
        order:
        ``occurred_at`` aware UTC; ``opened``, ``clicked`` and ``unsubscribed`` 0/1 (a click
        or an unsubscribe is an open too). Repeated opens the endpoint deduplicated are not
        there.
    """
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    end = start + dt.timedelta(days=1)
    path = Path(tracking_db)
    records: list[tuple[str, str, str]] = []
    if path.exists():
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            records = db.execute(
                "SELECT recipient_id, occurred_at, kind FROM events "
                "WHERE occurred_at >= ? AND occurred_at < ? ORDER BY occurred_at, event_id",
                (start.isoformat(), end.isoformat()),
            ).fetchall()
    flags = np.array([_EVENT_FLAGS[kind] for _, _, kind in records], dtype=np.int64).reshape(-1, 3)
    frame = pd.DataFrame(
        {
            "recipient_id": pd.Series([r for r, _, _ in records], dtype="str"),
            "occurred_at": pd.to_datetime([t for _, t, _ in records], utc=True, format="ISO8601"),
            "opened": flags[:, 0],
            "clicked": flags[:, 1],
            "unsubscribed": flags[:, 2],
        },
        columns=list(OUTCOME_COLUMNS),
    )
    # Outcome tables hold one row per recipient and time: two events at the same instant (a
    # click and an unsubscribe from one page) are one row with both flags.
    return (
        frame.groupby(["recipient_id", "occurred_at"], as_index=False, sort=False)
        .max()
        .sort_values(["occurred_at", "recipient_id"], kind="stable")
        .reset_index(drop=True)
    )


def _default_tracking_db() -> Path:
    # Imported here: the resources package pulls in the library, which the pure functions of this
    # module do not need.
    from resources.campaign_channels import tracking_db_path

    return tracking_db_path()


campaign_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START)


class CampaignSendsConfig(dg.Config):
    """How many recipients each flagged campaign's next send reaches."""

    send_size: int = Field(default=SEND_SIZE, ge=1, le=10_000, description="Per campaign.")


class CampaignOutcomesConfig(dg.Config):
    """Where the tracking endpoint keeps its events."""

    tracking_db: str | None = Field(
        default=None,
        description="The tracking endpoint's SQLite file; <var>/campaign_tracking.sqlite "
        "(AUTOEXEC_VAR_DIR) when unset.",
    )


def _int_counts(series: pd.Series, names: tuple[str, ...]) -> dict[str, int]:
    return {name: int((series == name).sum()) for name in names}


@dg.asset(group_name="campaigns", kinds={"pandas"}, partitions_def=campaign_partitions)
def campaign_metrics(context: dg.AssetExecutionContext) -> dg.MaterializeResult[pd.DataFrame]:
    """Every campaign's sends, opens, clicks and unsubscribes of the day."""
    metrics = generate_campaign_metrics(dt.date.fromisoformat(context.partition_key))
    sends = int(metrics["sends"].sum())
    return dg.MaterializeResult(
        value=metrics,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(metrics)),
            "sends": dg.MetadataValue.int(sends),
            "clicks": dg.MetadataValue.int(int(metrics["clicks"].sum())),
            "click_rate": dg.MetadataValue.float(
                round(float(metrics["clicks"].sum()) / sends, 5) if sends else 0.0
            ),
            "campaigns_per_segment": dg.MetadataValue.json(
                _int_counts(metrics["segment"], SEGMENT_NAMES)
            ),
        },
    )


@dg.asset(group_name="campaigns", kinds={"pandas"}, partitions_def=campaign_partitions)
def campaign_click_insight(campaign_metrics: pd.DataFrame) -> dg.MaterializeResult[pd.DataFrame]:
    """Each campaign's click rate against its segment's median; ``underperforming`` below 0.8 of it."""
    insight = click_insight(campaign_metrics)
    flagged = insight[insight["underperforming"]]
    benchmarks = insight.groupby("segment")["segment_benchmark"].first()
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("campaign_id", "string"),
            dg.TableColumn("campaign_name", "string"),
            dg.TableColumn("segment", "string"),
            dg.TableColumn("click_rate", "float"),
            dg.TableColumn("segment_benchmark", "float"),
            dg.TableColumn("benchmark_ratio", "float"),
        ]
    )
    records = [
        dg.TableRecord(
            {
                "campaign_id": str(row["campaign_id"]),
                "campaign_name": str(row["campaign_name"]),
                "segment": str(row["segment"]),
                "click_rate": round(float(row["click_rate"]), 5),
                "segment_benchmark": round(float(row["segment_benchmark"]), 5),
                "benchmark_ratio": round(float(row["benchmark_ratio"]), 3),
            }
        )
        for row in flagged.sort_values(["benchmark_ratio", "campaign_id"])
        .head(PREVIEW_ROWS)
        .to_dict("records")
    ]
    return dg.MaterializeResult(
        value=insight,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(insight)),
            "underperforming": dg.MetadataValue.int(len(flagged)),
            "underperforming_per_segment": dg.MetadataValue.json(
                _int_counts(flagged["segment"], SEGMENT_NAMES)
            ),
            "segment_benchmarks": dg.MetadataValue.json(
                {str(k): round(float(v), 5) for k, v in benchmarks.items()}
            ),
            "ratio": dg.MetadataValue.float(UNDERPERFORMING_RATIO),
            "preview": dg.MetadataValue.table(records, schema=schema),
        },
    )


@dg.asset(group_name="campaigns", kinds={"pandas"}, partitions_def=campaign_partitions)
def campaign_sends(
    context: dg.AssetExecutionContext,
    config: CampaignSendsConfig,
    campaign_click_insight: pd.DataFrame,
) -> dg.MaterializeResult[pd.DataFrame]:
    """The recipients of the next send of every underperforming campaign: what the
    ``campaign_optimisation`` playbook acts on (``flagged``)."""
    sends = next_sends(
        campaign_click_insight,
        dt.date.fromisoformat(context.partition_key),
        send_size=config.send_size,
    )
    per_campaign = sends.groupby("campaign_id").size()
    return dg.MaterializeResult(
        value=sends,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(sends)),
            # What the playbook's sensor reads, without loading the frame.
            "flagged": dg.MetadataValue.int(int(sends["flagged"].sum())),
            "campaigns": dg.MetadataValue.int(len(per_campaign)),
            "recipients_per_campaign": dg.MetadataValue.int(config.send_size),
            "recipients_per_segment": dg.MetadataValue.json(
                _int_counts(sends["segment"], SEGMENT_NAMES)
            ),
        },
    )


@dg.asset(
    group_name="campaigns",
    kinds={"pandas", "sqlite"},
    partitions_def=campaign_partitions,
    deps=[ACTIONS_KEY],
)
def campaign_outcomes(
    context: dg.AssetExecutionContext, config: CampaignOutcomesConfig
) -> dg.MaterializeResult[pd.DataFrame]:
    """The opens, clicks and unsubscribes the tracking endpoint recorded on the day."""
    path = Path(config.tracking_db) if config.tracking_db else _default_tracking_db()
    outcomes = read_outcomes(path, dt.date.fromisoformat(context.partition_key))
    return dg.MaterializeResult(
        value=outcomes,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(outcomes)),
            "recipients": dg.MetadataValue.int(int(outcomes["recipient_id"].nunique())),
            # Recipients, not events: a recipient who opens twice and clicks counts once in each.
            **{
                column: dg.MetadataValue.int(
                    int(outcomes.loc[outcomes[column] == 1, "recipient_id"].nunique())
                )
                for column in ("opened", "clicked", "unsubscribed")
            },
            "tracking_db": dg.MetadataValue.path(str(path)),
        },
    )
