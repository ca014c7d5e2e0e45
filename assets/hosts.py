"""The host-remediation pipeline of the reference deployment: host metrics, an anomaly model and
hourly anomaly scores.

About 2,000 hosts (roles web, worker and db, in three datacenters) report CPU, memory, disk, p95
latency and error rate once an hour. The numbers are generated, but they behave like a fleet's:
each role has its own baseline, each host its own offsets and disk fill, and load follows the
local time of the host's datacenter (a daily cycle). Every hour a small share of hosts (1-3%) has
a fault of a known kind, each with its own signature in the metrics:

- ``service_hung``: the service stops answering: p95 latency and error rate jump, CPU falls.
- ``disk_full``: the disk is 98-100% used (writes start failing: a few more errors).
- ``hardware``: errors and latency jump erratically, CPU is all over the place.

Which host has which fault is the ground truth, deterministic per partition:
:func:`injected_faults` returns it, the local infrastructure API
(``resources/infra_api.py``) reports it as the diagnosis, and the tests measure the model with it.
Faults are drawn independently for each hour: a host faulty at 10:00 is usually healthy at 11:00.

Assets:
    host_metrics_history: fault-free hourly metrics of the whole fleet before the first partition
        (not partitioned): what the model learns "normal" from.
    host_anomaly_model: an IsolationForest on fleet-relative features, with a calibration that
        maps its score to ``anomaly_score`` in [0, 1], evaluated against injected faults.
    host_anomalies: one row per host per hour (hourly partitions): the insight the
        host-remediation playbook acts on (``anomaly_score >= 0.8``).
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
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

PARTITIONS_START = "2026-12-01-00:00"
# Dagster's hourly partition keys look like "2026-12-01-10:00".
PARTITION_FORMAT = "%Y-%m-%d-%H:%M"
ANOMALY_THRESHOLD = 0.8
PREVIEW_ROWS = 10

ROLES = ("web", "worker", "db")
ROLE_COUNTS = {"web": 1000, "worker": 700, "db": 300}
N_HOSTS = sum(ROLE_COUNTS.values())
# Datacenter -> UTC offset in hours: load follows each datacenter's local day.
DATACENTERS = {"fra1": 1, "iad1": -5, "sin1": 8}
FAULT_KINDS = ("service_hung", "disk_full", "hardware")
FAULT_KIND_SHARES = (0.5, 0.3, 0.2)
# Faulty hosts per hour, drawn uniformly: 1-3% of the fleet.
FAULT_SHARE_RANGE = (0.01, 0.03)

INVENTORY_SEED = 41
METRICS_SEED = 2027
FAULT_SEED = 9091
# The training history ends the hour before the first partition; the evaluation window is the
# day before that, with faults injected, so the model is measured on hours it never saw.
HISTORY_HOURS = 48
EVALUATION_HOURS = 24

METRICS = ("cpu_pct", "memory_pct", "disk_used_pct", "p95_latency_ms", "error_rate_pct")
INVENTORY_COLUMNS = ("host_id", "role", "datacenter")
METRIC_COLUMNS = ("host_id", "role", "datacenter", "partition_hour", *METRICS)
ANOMALY_COLUMNS = (
    "host_id",
    "role",
    "datacenter",
    "partition_hour",
    "anomaly_score",
    *METRICS,
)


@dataclass(frozen=True)
class RoleBaseline:
    """What a healthy host of a role reports at average load.

    CPU and latency scale with the load of the daily cycle; memory follows it a little; disk is a
    per-host fill level that does not follow load.
    """

    cpu_pct: float
    memory_pct: float
    disk_range: tuple[float, float]
    p95_latency_ms: float
    error_rate_pct: float


BASELINES = {
    "web": RoleBaseline(35.0, 45.0, (25.0, 65.0), 120.0, 0.2),
    "worker": RoleBaseline(55.0, 60.0, (30.0, 70.0), 400.0, 0.5),
    "db": RoleBaseline(45.0, 75.0, (50.0, 85.0), 15.0, 0.05),
}
# Amplitude of the daily load cycle (1 +/- this), peaking at 14:00 local time.
DAILY_AMPLITUDE = 0.35
PEAK_LOCAL_HOUR = 14


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def partition_hour(key: str) -> dt.datetime:
    """The UTC hour a partition key (or an ISO 8601 timestamp) names.

    Accepts Dagster's hourly keys (``2026-12-01-10:00``) and ISO 8601 text
    (``2026-12-01T10:00``, ``2026-12-01T10:00:00+00:00``); minutes and seconds are dropped.

    Args:
        key: The partition key or timestamp.

    Returns:
        An aware UTC datetime on the hour.

    Raises:
        ValueError: ``key`` is neither form.
    """
    text = key.strip()
    try:
        when = dt.datetime.strptime(text, PARTITION_FORMAT)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"not an hourly partition key or ISO 8601 time: {key!r} "
                "(expected e.g. '2026-12-01-10:00')"
            ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def partition_key_of(hour: dt.datetime) -> str:
    """The Dagster hourly partition key of a UTC hour, e.g. ``2026-12-01-10:00``."""
    return hour.astimezone(dt.UTC).strftime(PARTITION_FORMAT)


def _hour_index(hour: dt.datetime) -> int:
    return int(hour.timestamp() // 3600)


@functools.cache
def _inventory() -> pd.DataFrame:
    who = _rng(INVENTORY_SEED)
    frames = []
    for role in ROLES:
        n = ROLE_COUNTS[role]
        frames.append(
            pd.DataFrame(
                {
                    "host_id": [f"{role}-{i:04d}" for i in range(1, n + 1)],
                    "role": role,
                    "datacenter": who.choice(np.array(list(DATACENTERS)), size=n),
                }
            )
        )
    return pd.concat(frames, ignore_index=True).astype(
        {"host_id": "str", "role": "str", "datacenter": "str"}
    )


def host_inventory() -> pd.DataFrame:
    """The fleet: host_id (``web-0001``, ``worker-0001``, ``db-0001``), role and datacenter.

    The inventory is fixed (seeded once), the same in every partition and every process.

    Returns:
        One row per host with the columns of ``INVENTORY_COLUMNS``.
    """
    return _inventory().copy()


@dataclass(frozen=True)
class _HostTraits:
    cpu_factor: np.ndarray
    memory_offset: np.ndarray
    disk_pct: np.ndarray
    latency_factor: np.ndarray
    error_factor: np.ndarray


@functools.cache
def _traits() -> _HostTraits:
    """Per-host offsets that make hosts of a role differ from each other, stably."""
    inventory = _inventory()
    draw = _rng(INVENTORY_SEED, 1)
    n = len(inventory)
    role = inventory["role"].to_numpy()
    low = np.select([role == r for r in ROLES], [BASELINES[r].disk_range[0] for r in ROLES])
    high = np.select([role == r for r in ROLES], [BASELINES[r].disk_range[1] for r in ROLES])
    return _HostTraits(
        cpu_factor=draw.lognormal(0.0, 0.12, size=n),
        memory_offset=draw.normal(0.0, 4.0, size=n),
        disk_pct=low + draw.random(n) * (high - low),
        latency_factor=draw.lognormal(0.0, 0.1, size=n),
        error_factor=draw.lognormal(0.0, 0.2, size=n),
    )


def _role_values(role: np.ndarray, field: str) -> np.ndarray:
    return np.select([role == r for r in ROLES], [getattr(BASELINES[r], field) for r in ROLES])


def daily_load(hour: dt.datetime, datacenter: np.ndarray) -> np.ndarray:
    """Load relative to the daily mean (1.0) for hosts in each datacenter at a UTC hour.

    Args:
        hour: The UTC hour.
        datacenter: One datacenter name per host.

    Returns:
        One factor per host, between ``1 - DAILY_AMPLITUDE`` and ``1 + DAILY_AMPLITUDE``.
    """
    offset = np.select(
        [datacenter == name for name in DATACENTERS], list(DATACENTERS.values()), default=0
    )
    local_hour = (hour.hour + offset) % 24
    # Peak at PEAK_LOCAL_HOUR: sin reaches 1 a quarter period after its zero.
    phase = 2.0 * math.pi * (local_hour - (PEAK_LOCAL_HOUR - 6)) / 24.0
    return 1.0 + DAILY_AMPLITUDE * np.sin(phase)


@functools.lru_cache(maxsize=256)
def _faults_for_hour(hour_index: int) -> tuple[tuple[str, str], ...]:
    inventory = _inventory()
    draw = _rng(FAULT_SEED, hour_index)
    low, high = FAULT_SHARE_RANGE
    n_faulty = int(draw.integers(round(low * N_HOSTS), round(high * N_HOSTS) + 1))
    rows = draw.choice(N_HOSTS, size=n_faulty, replace=False)
    kinds = draw.choice(np.array(FAULT_KINDS), size=n_faulty, p=FAULT_KIND_SHARES)
    hosts = inventory["host_id"].to_numpy()[np.sort(rows)]
    return tuple(zip(hosts.tolist(), kinds[np.argsort(rows)].tolist(), strict=True))


def injected_faults(partition_key: str) -> dict[str, str]:
    """The ground truth of a partition: which hosts have which fault.

    Deterministic per partition and independent of the metric noise, so the infrastructure API
    (diagnostics), the tests and the model's evaluation all agree on it.

    Args:
        partition_key: An hourly partition key (``2026-12-01-10:00``) or ISO 8601 time.

    Returns:
        host_id -> fault kind (one of ``FAULT_KINDS``) for the faulty hosts only; every other
        host is healthy (its cause is ``"none"``).
    """
    return dict(_faults_for_hour(_hour_index(partition_hour(partition_key))))


def fault_of(partition_key: str, host_id: str) -> str:
    """The injected fault of one host in one partition, or ``"none"`` when it is healthy.

    Args:
        partition_key: An hourly partition key or ISO 8601 time.
        host_id: A host of :func:`host_inventory`.

    Returns:
        ``service_hung``, ``disk_full``, ``hardware`` or ``none``.
    """
    return injected_faults(partition_key).get(host_id, "none")


def generate_host_metrics(partition_key: str, *, with_faults: bool = True) -> pd.DataFrame:
    """The fleet's metrics for one hour.

    The same partition key always gives the same frame; the healthy part of a host's metrics is
    the same with and without faults, so a fault changes only the faulty hosts' rows.

    Args:
        partition_key: An hourly partition key (``2026-12-01-10:00``) or ISO 8601 time.
        with_faults: Inject the faults of :func:`injected_faults`; False gives the fault-free
            fleet of the same hour (training history).

    Returns:
        One row per host with the columns of ``METRIC_COLUMNS``; ``partition_hour`` is the
        Dagster partition key of the hour.
    """
    hour = partition_hour(partition_key)
    inventory = _inventory()
    traits = _traits()
    n = len(inventory)
    role = inventory["role"].to_numpy()
    noise = _rng(METRICS_SEED, _hour_index(hour))
    load = daily_load(hour, inventory["datacenter"].to_numpy())

    cpu = _role_values(role, "cpu_pct") * load * traits.cpu_factor + noise.normal(0.0, 4.0, n)
    memory = (
        _role_values(role, "memory_pct") * (0.85 + 0.15 * load)
        + traits.memory_offset
        + noise.normal(0.0, 2.0, n)
    )
    disk = traits.disk_pct + noise.normal(0.0, 0.5, n)
    latency = (
        _role_values(role, "p95_latency_ms")
        * (0.6 + 0.4 * load)
        * traits.latency_factor
        * noise.lognormal(0.0, 0.12, n)
    )
    errors = (
        _role_values(role, "error_rate_pct")
        * load
        * traits.error_factor
        * noise.lognormal(0.0, 0.3, n)
    )
    # Drawn whether or not faults are injected, so both variants share the healthy draws.
    severity = _rng(FAULT_SEED, _hour_index(hour), 1)
    hung_latency = severity.uniform(8.0, 30.0, n)
    hung_errors = severity.uniform(10.0, 40.0, n)
    hung_cpu = severity.uniform(1.0, 6.0, n)
    full_disk = severity.uniform(98.0, 100.0, n)
    full_errors = severity.uniform(4.0, 12.0, n)
    full_latency = severity.uniform(1.5, 3.0, n)
    hw_errors = severity.uniform(3.0, 30.0, n)
    hw_latency = severity.lognormal(1.5, 0.6, n)
    hw_cpu = severity.uniform(2.0, 98.0, n)

    if with_faults:
        faults = injected_faults(partition_key)
        fault = inventory["host_id"].map(faults).fillna("none").to_numpy()
        hung = fault == "service_hung"
        full = fault == "disk_full"
        hardware = fault == "hardware"
        latency = np.where(hung, latency * hung_latency, latency)
        errors = np.where(hung, hung_errors, errors)
        cpu = np.where(hung, hung_cpu, cpu)
        disk = np.where(full, full_disk, disk)
        errors = np.where(full, errors * full_errors, errors)
        latency = np.where(full, latency * full_latency, latency)
        errors = np.where(hardware, hw_errors, errors)
        latency = np.where(hardware, latency * (2.0 + hw_latency), latency)
        cpu = np.where(hardware, hw_cpu, cpu)

    frame = inventory.assign(
        partition_hour=partition_key_of(hour),
        cpu_pct=np.clip(cpu, 0.5, 100.0).round(2),
        memory_pct=np.clip(memory, 5.0, 99.5).round(2),
        disk_used_pct=np.clip(disk, 1.0, 100.0).round(2),
        p95_latency_ms=np.maximum(latency, 1.0).round(1),
        error_rate_pct=np.clip(errors, 0.0, 100.0).round(3),
    )
    return frame.astype({"partition_hour": "str"})


def history_partition_keys(hours: int, *, end: str = PARTITIONS_START) -> list[str]:
    """The ``hours`` hourly partition keys that end just before ``end``, oldest first.

    Args:
        hours: How many hours.
        end: The first hour not included.

    Returns:
        Dagster hourly partition keys.
    """
    last = partition_hour(end)
    return [partition_key_of(last - dt.timedelta(hours=h)) for h in range(hours, 0, -1)]


def generate_history(hours: int = HISTORY_HOURS, *, with_faults: bool = False) -> pd.DataFrame:
    """The fleet's metrics for the ``hours`` hours before the first partition.

    Args:
        hours: How many hours of history.
        with_faults: Inject each hour's faults (for evaluation); fault-free by default (training).

    Returns:
        The frames of :func:`generate_host_metrics`, concatenated oldest first.
    """
    keys = history_partition_keys(hours)
    return pd.concat(
        [generate_host_metrics(key, with_faults=with_faults) for key in keys], ignore_index=True
    )


def _one_thread() -> threadpool_limits:
    """Run scikit-learn's native code on one thread (see ``assets.customers._one_thread``)."""
    return threadpool_limits(limits=1)


_RELATIVE = ("cpu", "memory", "latency", "errors")


def _relative(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each metric against the median of its peers: same role, same datacenter, same hour.

    Comparing a host with its peers removes the daily cycle (every host of a datacenter is busy
    at 14:00 local time), so the forest needs no notion of time. Latency and errors are compared on a log
    scale, where "ten times the usual" is one step whatever the role's baseline.
    """
    values = pd.DataFrame(
        {
            "cpu": metrics["cpu_pct"].to_numpy(dtype=float),
            "memory": metrics["memory_pct"].to_numpy(dtype=float),
            "latency": np.log(metrics["p95_latency_ms"].to_numpy(dtype=float)),
            "errors": np.log(metrics["error_rate_pct"].to_numpy(dtype=float) + 0.01),
        }
    )
    groups = [
        metrics["role"].to_numpy(),
        metrics["datacenter"].to_numpy(),
        metrics["partition_hour"].to_numpy(),
    ]
    peers = values.groupby(groups)[list(_RELATIVE)].transform("median")
    return values - peers


def _features(metrics: pd.DataFrame, scale: dict[str, dict[str, float]]) -> np.ndarray:
    """The forest's inputs: fleet-relative metrics in units of their role's spread, disk, strain.

    The spread (from the training history) puts the features in comparable units. Disk is kept
    absolute: a full disk is full whatever its peers report. Strain, the mean of the latency and
    error deviations, is there because an isolation forest saturates: a point far outside the
    training range on one axis is isolated no faster than the most extreme training point, so a
    host that is both slow and failing must stand out on an axis of its own (measured: it lifts
    the recall of hardware faults at the threshold from about 0.83 to 1.0).
    """
    relative = _relative(metrics).to_numpy()
    role = metrics["role"].to_numpy()
    spread = np.column_stack(
        [np.select([role == r for r in ROLES], [scale[r][c] for r in ROLES]) for c in _RELATIVE]
    )
    z = relative / spread
    disk = metrics["disk_used_pct"].to_numpy(dtype=float) / 10.0
    strain = (z[:, _RELATIVE.index("latency")] + z[:, _RELATIVE.index("errors")]) / 2.0
    return np.column_stack([z, disk, strain])


def _spread(metrics: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per role, the robust spread of each fleet-relative metric."""
    relative = _relative(metrics)
    scale: dict[str, dict[str, float]] = {}
    for role, group in relative.groupby(metrics["role"].to_numpy()):
        # Interquartile range / 1.349: the standard deviation of a normal, robust to outliers.
        iqr = group.quantile(0.75) - group.quantile(0.25)
        scale[str(role)] = {c: max(float(iqr[c]) / 1.349, 1e-6) for c in _RELATIVE}
    return scale


@dataclass(frozen=True)
class HostAnomalyModel:
    """An IsolationForest with the feature scaling and score calibration it was trained with.

    ``anomaly_score`` is a logistic transform of the forest's raw anomaly score
    (``-score_samples``), anchored on fault-free hosts held out from training: their median maps
    to 0.2 and their 99.9th percentile to ``ANOMALY_THRESHOLD`` (0.8). So about 0.1% of healthy
    hosts reach the threshold, and a host that does is stranger than 999 in 1,000 healthy ones.
    """

    forest: IsolationForest
    scale: dict[str, dict[str, float]]
    center: float
    width: float

    def score(self, metrics: pd.DataFrame) -> np.ndarray:
        """The calibrated anomaly score of each row of a metrics frame.

        Args:
            metrics: Frame from :func:`generate_host_metrics` (one or more hours).

        Returns:
            One score in [0, 1] per row, in the frame's order.
        """
        with _one_thread():
            raw = -self.forest.score_samples(_features(metrics, self.scale))
        return 1.0 / (1.0 + np.exp(-(raw - self.center) / self.width))


def train_host_anomaly_model(
    history: pd.DataFrame,
    *,
    calibration_fraction: float = 0.25,
    n_estimators: int = 200,
    random_state: int = 0,
) -> HostAnomalyModel:
    """Train the anomaly model on fault-free history.

    The last ``calibration_fraction`` of the hours is held out from the forest and only anchors
    the score calibration, so the calibration describes hosts the forest has not seen.

    Args:
        history: Fault-free frame from :func:`generate_history`.
        calibration_fraction: Share of hours held out for the calibration.
        n_estimators: Trees in the forest.
        random_state: Seed of the forest.

    Returns:
        The fitted, calibrated model.

    Raises:
        ValueError: The history has fewer than two hours.
    """
    hours = sorted(history["partition_hour"].unique())
    if len(hours) < 2:
        raise ValueError(f"the history needs at least two hours, got {len(hours)}")
    n_calibration = min(max(1, round(len(hours) * calibration_fraction)), len(hours) - 1)
    calibration_hours = set(hours[-n_calibration:])
    held_out = history["partition_hour"].isin(calibration_hours).to_numpy()
    train, calibration = history[~held_out], history[held_out]
    scale = _spread(train)
    # max_samples stays at its default, 256 rows per tree: 128 lost a third of the hardware
    # faults at the threshold, 512 bought nothing (measured on the evaluation window).
    forest = IsolationForest(n_estimators=n_estimators, random_state=random_state)
    with _one_thread():
        forest.fit(_features(train, scale))
        raw = -forest.score_samples(_features(calibration, scale))
    median, tail = float(np.quantile(raw, 0.5)), float(np.quantile(raw, 0.999))
    # Median -> 0.2 and tail -> 0.8: logit(0.8) = ln 4 = -logit(0.2).
    center = (median + tail) / 2.0
    width = max((tail - median) / (2.0 * math.log(4.0)), 1e-9)
    return HostAnomalyModel(forest=forest, scale=scale, center=center, width=width)


def evaluate_host_anomaly_model(
    model: HostAnomalyModel, metrics: pd.DataFrame, *, threshold: float = ANOMALY_THRESHOLD
) -> dict[str, Any]:
    """Measure the model against the injected faults of the hours in ``metrics``.

    Args:
        model: Model from :func:`train_host_anomaly_model`.
        metrics: Metrics with faults injected (one or more hours).
        threshold: The playbook's flag threshold on ``anomaly_score``.

    Returns:
        precision and recall at the threshold, false_positive_rate (share of healthy hosts
        flagged), roc_auc, recall per fault kind, hosts, faulty, flagged and hours.
    """
    fault = np.array(
        [
            fault_of(str(hour), str(host))
            for hour, host in zip(metrics["partition_hour"], metrics["host_id"], strict=True)
        ]
    )
    faulty = fault != "none"
    score = model.score(metrics)
    flagged = score >= threshold
    hits = int(np.sum(flagged & faulty))
    per_kind = {
        kind: float(np.mean(flagged[fault == kind])) if np.any(fault == kind) else float("nan")
        for kind in FAULT_KINDS
    }
    return {
        "precision": hits / max(int(flagged.sum()), 1),
        "recall": hits / max(int(faulty.sum()), 1),
        "false_positive_rate": float(np.mean(flagged[~faulty])) if np.any(~faulty) else 0.0,
        "roc_auc": float(roc_auc_score(faulty, score)) if 0 < faulty.sum() < len(faulty) else 0.0,
        "recall_per_kind": per_kind,
        "hosts": len(metrics),
        "faulty": int(faulty.sum()),
        "flagged": int(flagged.sum()),
        "hours": int(metrics["partition_hour"].nunique()),
        "threshold": threshold,
    }


def score_hosts(model: HostAnomalyModel, metrics: pd.DataFrame) -> pd.DataFrame:
    """The insight: each host's calibrated anomaly score next to its metrics.

    Args:
        model: Model from :func:`train_host_anomaly_model`.
        metrics: Frame from :func:`generate_host_metrics`.

    Returns:
        One row per host with the columns of ``ANOMALY_COLUMNS``.
    """
    scored = metrics.assign(anomaly_score=np.round(model.score(metrics), 6))
    return scored.reindex(columns=list(ANOMALY_COLUMNS)).reset_index(drop=True)


def anomaly_summary(anomalies: pd.DataFrame) -> dict[str, Any]:
    """Metadata of one hour's anomaly scores: counts and a preview of the most anomalous hosts.

    Hosts are not personal data, so the preview shows them unmasked.

    Args:
        anomalies: Frame from :func:`score_hosts`.

    Returns:
        Dagster metadata: row count, flagged (``anomaly_score >= ANOMALY_THRESHOLD``) overall and
        per role, the threshold, score quantiles and a preview table.
    """
    values = anomalies["anomaly_score"].to_numpy(dtype=float)
    flagged_mask = values >= ANOMALY_THRESHOLD
    flagged = int(flagged_mask.sum())
    per_role = {
        role: int(np.sum(flagged_mask & (anomalies["role"].to_numpy() == role))) for role in ROLES
    }
    top = anomalies.nlargest(PREVIEW_ROWS, "anomaly_score")
    preview_columns = ("host_id", "role", "datacenter", "anomaly_score", *METRICS)
    records = [
        dg.TableRecord(
            {
                "host_id": str(row["host_id"]),
                "role": str(row["role"]),
                "datacenter": str(row["datacenter"]),
                "anomaly_score": round(float(row["anomaly_score"]), 4),
                **{metric: float(row[metric]) for metric in METRICS},
            }
        )
        for row in top.to_dict("records")
    ]
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn(name, "string" if name in INVENTORY_COLUMNS else "float")
            for name in preview_columns
        ]
    )
    quantiles = {q: float(np.quantile(values, q / 100)) if len(values) else 0.0 for q in (50, 99)}
    return {
        "dagster/row_count": dg.MetadataValue.int(len(anomalies)),
        "flagged": dg.MetadataValue.int(flagged),
        "flagged_fraction": dg.MetadataValue.float(
            flagged / len(anomalies) if len(anomalies) else 0.0
        ),
        "flagged_per_role": dg.MetadataValue.json(per_role),
        "anomaly_threshold": dg.MetadataValue.float(ANOMALY_THRESHOLD),
        "score_quantiles": dg.MetadataValue.json(
            {f"p{q}": round(v, 4) for q, v in quantiles.items()}
        ),
        "preview": dg.MetadataValue.table(records, schema=schema),
    }


hourly_partitions = dg.HourlyPartitionsDefinition(start_date=PARTITIONS_START)


class HostHistoryConfig(dg.Config):
    """How much fault-free history the model learns from."""

    hours: int = Field(default=HISTORY_HOURS, ge=2, description="Hours before the first partition.")


class HostModelConfig(dg.Config):
    """How the anomaly model is trained and measured."""

    evaluation_hours: int = Field(
        default=EVALUATION_HOURS, ge=1, description="Hours with injected faults it is measured on."
    )
    n_estimators: int = Field(default=200, ge=10, description="Trees in the forest.")
    random_state: int = Field(default=0, description="Seed of the forest.")


_ANOMALY_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("host_id", "string", description="Entity key, e.g. web-0001."),
        dg.TableColumn("role", "string", description="web, worker or db."),
        dg.TableColumn("datacenter", "string", description="fra1, iad1 or sin1."),
        dg.TableColumn(
            "partition_hour", "string", description="The partition key, e.g. 2026-12-01-10:00."
        ),
        dg.TableColumn("anomaly_score", "float", description="0..1; 0.8 and above is anomalous."),
        dg.TableColumn("cpu_pct", "float"),
        dg.TableColumn("memory_pct", "float"),
        dg.TableColumn("disk_used_pct", "float"),
        dg.TableColumn("p95_latency_ms", "float"),
        dg.TableColumn("error_rate_pct", "float"),
    ]
)


@dg.asset(group_name="hosts", kinds={"pandas"})
def host_metrics_history(config: HostHistoryConfig) -> dg.MaterializeResult[pd.DataFrame]:
    """Fault-free hourly metrics of the whole fleet before the first partition."""
    history = generate_history(config.hours)
    keys = history_partition_keys(config.hours)
    return dg.MaterializeResult(
        value=history,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(history)),
            "hosts": dg.MetadataValue.int(int(history["host_id"].nunique())),
            "first_hour": dg.MetadataValue.text(keys[0]),
            "last_hour": dg.MetadataValue.text(keys[-1]),
        },
    )


@dg.asset(group_name="hosts", kinds={"scikitlearn"})
def host_anomaly_model(
    config: HostModelConfig, host_metrics_history: pd.DataFrame
) -> dg.MaterializeResult[HostAnomalyModel]:
    """IsolationForest on fleet-relative metrics, measured against injected faults."""
    model = train_host_anomaly_model(
        host_metrics_history, n_estimators=config.n_estimators, random_state=config.random_state
    )
    # The evaluation window ends where the history starts: hours the model never saw.
    first_history_hour = str(host_metrics_history["partition_hour"].min())
    keys = history_partition_keys(config.evaluation_hours, end=first_history_hour)
    evaluation = pd.concat([generate_host_metrics(key) for key in keys], ignore_index=True)
    metrics = evaluate_host_anomaly_model(model, evaluation)
    return dg.MaterializeResult(
        value=model,
        metadata={
            "precision_at_threshold": dg.MetadataValue.float(round(metrics["precision"], 4)),
            "recall_at_threshold": dg.MetadataValue.float(round(metrics["recall"], 4)),
            "false_positive_rate": dg.MetadataValue.float(round(metrics["false_positive_rate"], 5)),
            "roc_auc": dg.MetadataValue.float(round(metrics["roc_auc"], 4)),
            "recall_per_fault_kind": dg.MetadataValue.json(
                {k: round(v, 4) for k, v in metrics["recall_per_kind"].items()}
            ),
            "anomaly_threshold": dg.MetadataValue.float(ANOMALY_THRESHOLD),
            "training_rows": dg.MetadataValue.int(len(host_metrics_history)),
            "evaluation_rows": dg.MetadataValue.int(metrics["hosts"]),
            "evaluation_faults": dg.MetadataValue.int(metrics["faulty"]),
            "evaluation_hours": dg.MetadataValue.text(f"{keys[0]} .. {keys[-1]}"),
            "features": dg.MetadataValue.json(list(METRICS)),
        },
    )


@dg.asset(
    group_name="hosts",
    kinds={"pandas", "scikitlearn"},
    partitions_def=hourly_partitions,
    metadata={"dagster/column_schema": _ANOMALY_SCHEMA},
)
def host_anomalies(
    context: dg.AssetExecutionContext, host_anomaly_model: HostAnomalyModel
) -> dg.MaterializeResult[pd.DataFrame]:
    """Each host's anomaly score for the hour: the insight the host-remediation playbook acts on."""
    metrics = generate_host_metrics(context.partition_key)
    anomalies = score_hosts(host_anomaly_model, metrics)
    return dg.MaterializeResult(value=anomalies, metadata=anomaly_summary(anomalies))
