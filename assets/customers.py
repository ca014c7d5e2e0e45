"""The churn pipeline of the reference deployment: customers, a churn model and daily churn scores.

The data is generated, so the demo runs anywhere, but it is not noise: a hidden churn propensity (a
logistic function of the customer's features plus noise) decides who churned in the training
snapshot, so the model learns a real relationship and ranks a new day's customers the way the
propensity does.

Assets:
    raw_customers: a training snapshot of customers with a ``churned`` label (not partitioned).
    churn_model: a scikit-learn pipeline trained on ``raw_customers`` with a held-out split.
    churn_scores: one row per customer per day (daily partitions): the insight the churn playbook
        (``resources/churn_playbook.yaml``) acts on.

The numbers below are tuned together with the playbook's thresholds: of the 20,000 customers of a
daily partition about 1,000 score ``churn_score >= 0.5``, and about 5% of those are escalated to a
person (high value at risk, or a score too close to the flag threshold to act on). The tests pin
both shares on the real configuration.
"""

import datetime as dt
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder
from threadpoolctl import threadpool_limits

PARTITIONS_START = "2026-11-01"
# The training snapshot is taken the day before the first scored partition, and every signup date
# is drawn back from it, so a customer's signup date does not move from one partition to the next.
SNAPSHOT_DATE = dt.date(2026, 10, 31)
TRAINING_CUSTOMERS = 50_000
DAILY_CUSTOMERS = 20_000
# Distinct seeds: the scored customers are not the ones the model was trained on.
TRAINING_SEED = 7
SCORING_SEED = 2026
FLAG_THRESHOLD = 0.5
PREVIEW_ROWS = 10

PLANS = ("basic", "standard", "premium")
PLAN_SHARES = (0.5, 0.38, 0.12)
PLAN_CHARGE_RANGE = {"basic": (19.0, 39.0), "standard": (49.0, 79.0), "premium": (99.0, 149.0)}
REGIONS = ("NA", "EMEA", "APAC", "LATAM")
REGION_SHARES = (0.4, 0.3, 0.2, 0.1)
# Reserved for documentation (RFC 2606): a demo must never mail a real domain.
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
NUMERIC_FEATURES = (
    "tenure_months",
    "monthly_charge",
    "usage_trend",
    "support_tickets_90d",
    "last_login_days",
    "lifetime_value",
)
CATEGORICAL_FEATURES = ("plan", "region")
FEATURES = NUMERIC_FEATURES + CATEGORICAL_FEATURES
CUSTOMER_COLUMNS = (
    "customer_id",
    "name",
    "email",
    "signup_date",
    "tenure_months",
    "plan",
    "monthly_charge",
    "usage_trend",
    "support_tickets_90d",
    "last_login_days",
    "lifetime_value",
    "region",
)
SCORE_COLUMNS = (
    "customer_id",
    "name",
    "email",
    "plan",
    "lifetime_value",
    "tenure_months",
    "churn_score",
    "confidence",
    "monthly_charge",
    "usage_trend",
    "support_tickets_90d",
    "last_login_days",
    "region",
)

# A customer goes through a disengagement episode of this many days once per cycle; the cycle is
# chosen so that DRIFTING_SHARE of the population is inside an episode on any day. Episodes make
# the flagged set change slowly from day to day, as a real one does, instead of being redrawn or
# fixed forever.
DRIFTING_SHARE = 0.05
DRIFT_EPISODE_DAYS = 10
DRIFT_CYCLE_DAYS = round(DRIFT_EPISODE_DAYS / DRIFTING_SHARE)

_FIRST_NAMES = (
    "Ava", "Liam", "Olivia", "Noah", "Emma", "Mateo", "Sofia", "Lucas", "Mia", "Arjun",
    "Amara", "Kenji", "Zara", "Ethan", "Chloe", "Omar", "Leila", "Diego", "Hana", "Felix",
    "Ines", "Tomas", "Priya", "Jonas", "Yara", "Samuel", "Nina", "Kofi", "Elena", "Marco",
    "Aisha", "Ravi", "Freya", "Hugo", "Mei", "Oscar", "Lena", "Tariq", "Clara", "Daniel",
)  # fmt: skip
_LAST_NAMES = (
    "Smith", "Garcia", "Nguyen", "Muller", "Rossi", "Kim", "Okafor", "Silva", "Novak", "Haddad",
    "Patel", "Tanaka", "Johansson", "Kowalski", "Dubois", "Ivanova", "Mensah", "Lopez", "Chen",
    "Brown", "Jensen", "Costa", "Sato", "Fischer", "Khan", "Moreau", "Santos", "Walsh", "Ali",
    "Larsen", "Romero", "Nakamura", "Bauer", "Osei", "Petrov", "Reyes", "Cohen", "Lindqvist",
)  # fmt: skip


@dataclass(frozen=True)
class Propensity:
    """Coefficients of the hidden churn propensity, in log-odds per unit of each feature.

    The intercept moves the whole population; the slopes decide how well the features separate
    churners from the rest, and so how many scores land near the flag threshold.
    """

    intercept: float = -3.1
    usage_trend: float = -7.0
    support_tickets_90d: float = 0.35
    last_login_days: float = 0.06
    tenure_months: float = -0.02
    plan_basic: float = 0.3
    plan_premium: float = -0.3
    noise_sd: float = 0.5


PROPENSITY = Propensity()


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def generate_customers(
    n: int, *, seed: int, as_of: dt.date, snapshot_date: dt.date = SNAPSHOT_DATE
) -> pd.DataFrame:
    """Generate ``n`` plausible customers as they look on ``as_of``.

    Who the customers are (id, name, email, plan, region, signup date, engagement, when their
    disengagement episodes fall) depends only on ``seed``; how they behave that day (usage trend,
    tickets, last login) is drawn from ``(seed, as_of)``. The same arguments give the same frame.

    Args:
        n: Number of customers.
        seed: Identifies the population.
        as_of: The day the features describe.
        snapshot_date: Signup dates are drawn back from this day.

    Returns:
        One row per customer with the columns of ``CUSTOMER_COLUMNS``.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    who = _rng(seed)
    day = _rng(seed, as_of.toordinal())

    first = who.choice(np.array(_FIRST_NAMES), size=n)
    last = who.choice(np.array(_LAST_NAMES), size=n)
    domain = who.choice(np.array(EMAIL_DOMAINS), size=n)
    plan = who.choice(np.array(PLANS), size=n, p=PLAN_SHARES)
    region = who.choice(np.array(REGIONS), size=n, p=REGION_SHARES)
    charge_unit = who.random(n)
    tenure_days = np.minimum(15 + who.gamma(1.6, 520.0, size=n), 3650).astype(np.int64)
    engagement = who.normal(0.0, 1.0, size=n)
    episode_phase = who.integers(0, DRIFT_CYCLE_DAYS, size=n)
    ltv_factor = who.uniform(0.95, 1.15, size=n)

    drifting = (as_of.toordinal() + episode_phase) % DRIFT_CYCLE_DAYS < DRIFT_EPISODE_DAYS
    # A drifting customer's usage falls, tickets rise and logins lapse: the signals the hidden
    # propensity reads, so drifting customers are the ones the model learns to flag.
    disengaged = np.maximum(-engagement, 0.0)
    usage_trend = 0.05 + 0.05 * engagement - 0.6 * drifting + day.normal(0.0, 0.06, size=n)
    tickets = day.poisson(0.5 + 2.5 * drifting + 0.3 * disengaged)
    last_login = np.round(day.exponential(2.0 + 12.0 * drifting + 2.0 * disengaged))

    ids = pd.Series(np.arange(1, n + 1))
    first_s, last_s = pd.Series(first, dtype="str"), pd.Series(last, dtype="str")
    email = (
        first_s.str.lower()
        + "."
        + last_s.str.lower()
        + ids.astype(str)
        + "@"
        + pd.Series(domain, dtype="str")
    )
    low = np.select([plan == p for p in PLANS], [PLAN_CHARGE_RANGE[p][0] for p in PLANS])
    high = np.select([plan == p for p in PLANS], [PLAN_CHARGE_RANGE[p][1] for p in PLANS])
    monthly_charge = np.round(low + charge_unit * (high - low), 2)
    signup_date = pd.Timestamp(snapshot_date) - pd.to_timedelta(tenure_days, unit="D")
    age_days = (pd.Timestamp(as_of) - signup_date).days.to_numpy()
    tenure_months = np.maximum(age_days // 30, 0).astype(np.int64)

    return pd.DataFrame(
        {
            "customer_id": ids.map("C{:06d}".format),
            "name": first_s + " " + last_s,
            "email": email,
            "signup_date": signup_date,
            "tenure_months": tenure_months,
            "plan": plan,
            "monthly_charge": monthly_charge,
            "usage_trend": np.clip(usage_trend, -1.0, 1.0).round(3),
            "support_tickets_90d": tickets.astype(np.int64),
            "last_login_days": last_login.astype(np.int64),
            "lifetime_value": np.round(monthly_charge * tenure_months * ltv_factor, 2),
            "region": region,
        }
    ).astype({"plan": "str", "region": "str"})


def churn_logit(customers: pd.DataFrame, propensity: Propensity = PROPENSITY) -> np.ndarray:
    """The hidden churn propensity in log-odds, before noise.

    Args:
        customers: Frame from :func:`generate_customers`.
        propensity: Coefficients.

    Returns:
        One log-odds value per customer.
    """
    p = propensity
    plan = customers["plan"].to_numpy()
    return np.asarray(
        p.intercept
        + p.usage_trend * customers["usage_trend"].to_numpy()
        + p.support_tickets_90d * customers["support_tickets_90d"].to_numpy()
        + p.last_login_days * customers["last_login_days"].to_numpy()
        + p.tenure_months * customers["tenure_months"].to_numpy()
        + p.plan_basic * (plan == "basic")
        + p.plan_premium * (plan == "premium"),
        dtype=np.float64,
    )


def generate_training_snapshot(
    n: int = TRAINING_CUSTOMERS, *, seed: int = TRAINING_SEED, as_of: dt.date = SNAPSHOT_DATE
) -> pd.DataFrame:
    """Generate customers with a ``churned`` label drawn from the hidden propensity.

    Args:
        n: Number of customers.
        seed: Identifies the population and the label draw.
        as_of: The day of the snapshot.

    Returns:
        The frame of :func:`generate_customers` plus a boolean ``churned`` column.
    """
    customers = generate_customers(n, seed=seed, as_of=as_of)
    labels = _rng(seed, as_of.toordinal(), 1)
    logit = churn_logit(customers) + labels.normal(0.0, PROPENSITY.noise_sd, size=n)
    customers["churned"] = labels.random(n) < 1.0 / (1.0 + np.exp(-logit))
    return customers


def _one_thread() -> threadpool_limits:
    """Run scikit-learn's OpenMP code on one thread.

    On this 2-core machine the webserver, the daemon and the run share the cores; OpenMP's
    spinning threads then slow a small fit down threefold, while one thread trains the 50,000-row
    snapshot in under a second.
    """
    return threadpool_limits(limits=1)


def build_churn_model(random_state: int = 0) -> Pipeline:
    """An untrained churn model: one-hot categories, gradient-boosted trees.

    Args:
        random_state: Seed of the early-stopping split, so training is reproducible.

    Returns:
        A scikit-learn pipeline that takes the ``FEATURES`` columns.
    """
    encode = ColumnTransformer(
        [
            (
                "categories",
                OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                list(CATEGORICAL_FEATURES),
            ),
            ("numbers", "passthrough", list(NUMERIC_FEATURES)),
        ],
        verbose_feature_names_out=False,
    )
    # Early stopping always, not only above 10,000 rows: small test snapshots train fast too.
    classifier = HistGradientBoostingClassifier(
        max_iter=200,
        early_stopping=True,  # pyright: ignore[reportArgumentType] - sklearn takes "auto" or a bool
        random_state=random_state,
    )
    return Pipeline([("encode", encode), ("classify", classifier)])


def train_churn_model(
    snapshot: pd.DataFrame, *, test_fraction: float = 0.2, random_state: int = 0
) -> tuple[Pipeline, dict[str, Any]]:
    """Train the churn model on a labelled snapshot and measure it on a held-out split.

    Args:
        snapshot: Frame from :func:`generate_training_snapshot`.
        test_fraction: Share of rows held out (stratified on the label).
        random_state: Seed of the split and of the model.

    Returns:
        The pipeline fitted on the training split (the metrics describe exactly the model that
        is returned) and its held-out metrics: roc_auc, precision and recall at
        ``FLAG_THRESHOLD``, flagged_fraction, churn_rate, training_rows, test_rows.
    """
    x = snapshot[list(FEATURES)]
    y = snapshot["churned"].to_numpy(dtype=bool)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=random_state, stratify=y
    )
    with _one_thread():
        model = build_churn_model(random_state).fit(x_train, y_train)
        score = model.predict_proba(x_test)[:, 1]
    flagged = score >= FLAG_THRESHOLD
    hits = int(np.sum(flagged & y_test))
    metrics: dict[str, Any] = {
        "roc_auc": float(roc_auc_score(y_test, score)),
        "precision_at_threshold": hits / max(int(flagged.sum()), 1),
        "recall_at_threshold": hits / max(int(np.sum(y_test)), 1),
        "flagged_fraction": float(np.mean(flagged)),
        "churn_rate": float(np.mean(y)),
        "training_rows": len(x_train),
        "test_rows": len(x_test),
    }
    return model, metrics


def score_customers(model: Pipeline, customers: pd.DataFrame) -> pd.DataFrame:
    """Score customers with the churn model.

    ``confidence`` is the model's margin, ``|2 * churn_score - 1|``: 0 when the score sits on the
    flag threshold (the model cannot tell), 1 when it is certain either way. The playbook escalates
    flagged customers whose confidence is low instead of acting on a coin toss.

    Args:
        model: Pipeline from :func:`train_churn_model`.
        customers: Frame from :func:`generate_customers`.

    Returns:
        One row per customer with the columns of ``SCORE_COLUMNS``.
    """
    with _one_thread():
        score = np.round(model.predict_proba(customers[list(FEATURES)])[:, 1], 6)
    # From the rounded score, so that confidence < c holds exactly when the score is within c/2
    # of 0.5, as the playbook's rules assume.
    scored = customers.assign(churn_score=score, confidence=np.round(np.abs(2.0 * score - 1.0), 6))
    return scored.reindex(columns=list(SCORE_COLUMNS)).reset_index(drop=True)


def mask_email(email: str) -> str:
    """Mask the local part of an email address for metadata previews.

    Args:
        email: An address such as ``ava.smith12@example.com``.

    Returns:
        The first character of the local part and the domain, e.g. ``a***@example.com``.
    """
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def score_summary(scores: pd.DataFrame) -> dict[str, dg.MetadataValue]:
    """Materialization metadata of a day's scores: counts, a histogram, a masked preview.

    Bounded whatever the row count: ten histogram bins and ``PREVIEW_ROWS`` preview rows. The
    preview shows the customers most at risk with their email masked and no name.

    Args:
        scores: Frame from :func:`score_customers`.

    Returns:
        Metadata values keyed by label.
    """
    values = scores["churn_score"].to_numpy(dtype=np.float64)
    flagged = int(np.sum(values >= FLAG_THRESHOLD))
    counts, edges = np.histogram(values, bins=10, range=(0.0, 1.0))
    histogram = "| churn_score | customers |\n| --- | ---: |\n" + "".join(
        f"| {lo:.1f} - {hi:.1f} | {count:,} |\n"
        for lo, hi, count in zip(edges[:-1], edges[1:], counts, strict=True)
    )
    top = scores.nlargest(PREVIEW_ROWS, "churn_score")
    records = [
        dg.TableRecord(
            {
                "customer_id": str(row["customer_id"]),
                "email": mask_email(str(row["email"])),
                "plan": str(row["plan"]),
                "lifetime_value": float(row["lifetime_value"]),
                "churn_score": round(float(row["churn_score"]), 4),
                "confidence": round(float(row["confidence"]), 4),
            }
        )
        for row in top.to_dict("records")
    ]
    preview_schema = dg.TableSchema(
        columns=[
            dg.TableColumn("customer_id", "string"),
            dg.TableColumn("email", "string", description="masked"),
            dg.TableColumn("plan", "string"),
            dg.TableColumn("lifetime_value", "float"),
            dg.TableColumn("churn_score", "float"),
            dg.TableColumn("confidence", "float"),
        ]
    )
    quantiles = {
        q: float(np.quantile(values, q / 100)) if len(values) else 0.0 for q in (50, 90, 99)
    }
    return {
        "dagster/row_count": dg.MetadataValue.int(len(scores)),
        "flagged": dg.MetadataValue.int(flagged),
        "flagged_fraction": dg.MetadataValue.float(flagged / len(scores) if len(scores) else 0.0),
        "flag_threshold": dg.MetadataValue.float(FLAG_THRESHOLD),
        "score_histogram": dg.MetadataValue.md(histogram),
        "score_quantiles": dg.MetadataValue.json(
            {f"p{q}": round(v, 4) for q, v in quantiles.items()}
        ),
        "preview": dg.MetadataValue.table(records, schema=preview_schema),
    }


daily_partitions = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START)


class RawCustomersConfig(dg.Config):
    """Size and seed of the training snapshot."""

    n_customers: int = Field(default=TRAINING_CUSTOMERS, ge=100, description="Customers drawn.")
    seed: int = Field(default=TRAINING_SEED, description="Identifies the population.")


class ChurnModelConfig(dg.Config):
    """How the churn model is trained and measured."""

    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="Held-out share.")
    random_state: int = Field(default=0, description="Seed of the split and the model.")


class ChurnScoresConfig(dg.Config):
    """The population scored each day."""

    n_customers: int = Field(default=DAILY_CUSTOMERS, ge=1, description="Customers scored.")
    seed: int = Field(default=SCORING_SEED, description="Identifies the population.")


_SCORE_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("customer_id", "string", description="Entity key, e.g. C000123."),
        dg.TableColumn("name", "string", description="Personal."),
        dg.TableColumn("email", "string", description="Personal."),
        dg.TableColumn("plan", "string", description="basic, standard or premium."),
        dg.TableColumn("lifetime_value", "float", description="Revenue to date."),
        dg.TableColumn("tenure_months", "int"),
        dg.TableColumn("churn_score", "float", description="Probability of churn, 0..1."),
        dg.TableColumn("confidence", "float", description="|2 * churn_score - 1|, 0..1."),
        dg.TableColumn("monthly_charge", "float"),
        dg.TableColumn("usage_trend", "float", description="Negative means declining usage."),
        dg.TableColumn("support_tickets_90d", "int"),
        dg.TableColumn("last_login_days", "int"),
        dg.TableColumn("region", "string"),
    ]
)


@dg.asset(group_name="churn", kinds={"pandas"})
def raw_customers(config: RawCustomersConfig) -> dg.MaterializeResult[pd.DataFrame]:
    """A snapshot of customers on the snapshot date, labelled with whether they churned since."""
    snapshot = generate_training_snapshot(config.n_customers, seed=config.seed)
    return dg.MaterializeResult(
        value=snapshot,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(len(snapshot)),
            "churn_rate": dg.MetadataValue.float(
                float(np.mean(snapshot["churned"].to_numpy(dtype=bool)))
            ),
            "snapshot_date": dg.MetadataValue.text(SNAPSHOT_DATE.isoformat()),
        },
    )


@dg.asset(group_name="churn", kinds={"scikitlearn"})
def churn_model(
    config: ChurnModelConfig, raw_customers: pd.DataFrame
) -> dg.MaterializeResult[Pipeline]:
    """Gradient-boosted churn classifier, measured on a held-out split of the snapshot."""
    model, metrics = train_churn_model(
        raw_customers, test_fraction=config.test_fraction, random_state=config.random_state
    )
    return dg.MaterializeResult(
        value=model,
        metadata={
            "roc_auc": dg.MetadataValue.float(round(metrics["roc_auc"], 4)),
            "precision_at_threshold": dg.MetadataValue.float(
                round(metrics["precision_at_threshold"], 4)
            ),
            "recall_at_threshold": dg.MetadataValue.float(round(metrics["recall_at_threshold"], 4)),
            "flag_threshold": dg.MetadataValue.float(FLAG_THRESHOLD),
            "churn_rate": dg.MetadataValue.float(round(metrics["churn_rate"], 4)),
            "training_rows": dg.MetadataValue.int(metrics["training_rows"]),
            "test_rows": dg.MetadataValue.int(metrics["test_rows"]),
            "features": dg.MetadataValue.json(list(FEATURES)),
        },
    )


@dg.asset(
    group_name="churn",
    kinds={"pandas", "scikitlearn"},
    partitions_def=daily_partitions,
    metadata={"dagster/column_schema": _SCORE_SCHEMA},
)
def churn_scores(
    context: dg.AssetExecutionContext, config: ChurnScoresConfig, churn_model: Pipeline
) -> dg.MaterializeResult[pd.DataFrame]:
    """Each customer's churn score for the day: the insight the churn playbook acts on."""
    as_of = dt.date.fromisoformat(context.partition_key)
    customers = generate_customers(config.n_customers, seed=config.seed, as_of=as_of)
    scores = score_customers(churn_model, customers)
    return dg.MaterializeResult(value=scores, metadata=score_summary(scores))
