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
    churn_outcomes: per day, whether the customers the playbook acted on or held out in the 14
        days before were retained (and whether they unsubscribed): simulated from the ledger's
        exposures with known true effects per arm (``TRUE_RETENTION_LIFT``), the outcomes the
        retention experiment and the uplift against the holdout are measured with.

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

from autoexec_dagster import ActionLedger
from resources.channels import default_ledger_url

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


# -- outcomes: what happened to the customers the playbook acted on (or held out) --------------
#
# The simulation's TRUE effects, which a correct analysis of the experiment and of the uplift
# against the holdout must recover. A customer's retention depends only on the arm of its first
# exposure: held out (no email, no task) keeps BASELINE_RETENTION, every treated arm adds its lift.
OUTCOME_PLAYBOOK = "churn_outreach"
OUTCOME_WINDOW_DAYS = 14
OUTCOME_SEED = 2027
HOLDOUT_ARM = "holdout"
TREATED_ARM = "treated"
BASELINE_RETENTION = 0.60
# (action, arm) -> absolute lift in retention over the held-out customers of the same action.
# "treated" is an action sent without an experiment variant: the CRM task, and the retention
# email's own template should the experiment be removed from the playbook.
TRUE_RETENTION_LIFT: dict[tuple[str, str], float] = {
    ("retention_email", "check_in"): 0.02,
    ("retention_email", "discount_20"): 0.08,
    ("retention_email", "free_month"): 0.05,
    ("retention_email", TREATED_ARM): 0.05,
    ("crm_task", TREATED_ARM): 0.03,
}
# Held-out customers unsubscribe too (from the newsletter); an email adds a little, all well below
# the experiment's 2% guardrail.
BASELINE_UNSUBSCRIBE = 0.002
TRUE_UNSUBSCRIBE_RATE: dict[tuple[str, str], float] = {
    ("retention_email", "check_in"): 0.004,
    ("retention_email", "discount_20"): 0.006,
    ("retention_email", "free_month"): 0.005,
    ("retention_email", TREATED_ARM): 0.005,
    ("crm_task", TREATED_ARM): 0.002,
}
OUTCOME_COLUMNS = ("customer_id", "occurred_at", "retained", "unsubscribed")
# pandas' SipHash key (16 bytes): fixed, so the draws are the same in every process.
_HASH_KEY = "churn-outcomes-1"
_MIX = np.uint64(0x9E3779B97F4A7C15)


def true_rates(action: str, arm: str) -> tuple[float, float]:
    """The simulation's true retention and unsubscribe rates of one arm of one action.

    Args:
        action: The playbook action (``retention_email``, ``crm_task``).
        arm: ``holdout``, ``treated`` or an experiment variant.

    Returns:
        (retention rate, unsubscribe rate).

    Raises:
        ValueError: The (action, arm) pair has no documented truth: a simulation that guessed
            would make the experiment's results meaningless.
    """
    if arm == HOLDOUT_ARM:
        return BASELINE_RETENTION, BASELINE_UNSUBSCRIBE
    key = (action, arm)
    if key not in TRUE_RETENTION_LIFT:
        raise ValueError(
            f"no true effect is documented for action {action!r}, arm {arm!r}; known: "
            f"{sorted(TRUE_RETENTION_LIFT)} and the holdout"
        )
    return BASELINE_RETENTION + TRUE_RETENTION_LIFT[key], TRUE_UNSUBSCRIBE_RATE[key]


def _hash_strings(values: pd.Series | str) -> np.ndarray:
    if isinstance(values, str):
        values = pd.Series([values])
    return pd.util.hash_array(
        values.astype(str).to_numpy(dtype=object), hash_key=_HASH_KEY, categorize=False
    ).astype(np.uint64)


def _uniforms(seed: int, customer_ids: pd.Series, *parts: str | pd.Series) -> np.ndarray:
    """One uniform draw in [0, 1) per customer, a function of the seed, the customer and ``parts``.

    A keyed hash rather than a random generator: a customer's draw must not depend on which
    other customers are in the frame, nor on their order, nor on when the frame is read.

    Args:
        seed: Identifies the simulated world.
        customer_ids: The customers, as strings.
        *parts: What the draw is for: constants (``"delay"``) or per-customer values (the arm).

    Returns:
        A float array aligned with ``customer_ids``.
    """
    hashed = _hash_strings(customer_ids)
    for part in (str(seed), *parts):
        mixed = _hash_strings(part)
        # Integer mixing (pandas hashes uint64 arithmetically) combines the parts without
        # building one string per customer and part, which costs seconds at 100,000 customers.
        with np.errstate(over="ignore"):
            hashed = pd.util.hash_array((hashed * _MIX) ^ mixed).astype(np.uint64)
    return (hashed >> np.uint64(11)).astype(np.float64) / float(2**53)


def outcome_delay_days(customer_ids: pd.Series, *, seed: int = OUTCOME_SEED) -> np.ndarray:
    """Each customer's outcome delay k, 1 to ``OUTCOME_WINDOW_DAYS``: its outcome is observed
    k - 0.5 days after its first exposure.

    Args:
        customer_ids: The customers.
        seed: Identifies the simulated world.

    Returns:
        An int64 array aligned with ``customer_ids``.
    """
    draw = _uniforms(seed, customer_ids, "delay")
    return (1 + np.floor(draw * OUTCOME_WINDOW_DAYS)).astype(np.int64)


def _empty_outcomes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": pd.Series(dtype="str"),
            "occurred_at": pd.Series(dtype="datetime64[ns, UTC]"),
            "retained": pd.Series(dtype="int64"),
            "unsubscribed": pd.Series(dtype="int64"),
        }
    )


def simulate_churn_outcomes(
    exposures: pd.DataFrame, day: dt.date, *, seed: int = OUTCOME_SEED
) -> pd.DataFrame:
    """The outcomes observed on ``day`` for the customers in ``exposures``.

    Each customer has one outcome, decided by the arm of its first exposure (by ``exposed_at``)
    and observed ``outcome_delay_days - 0.5`` days after it (half a day to 13.5 days): so it falls
    on exactly one day and strictly inside the 14-day window, whatever the time of the exposure.
    Whether it was retained or unsubscribed is a seeded hash of the customer id and the arm
    against the arm's true rate (:func:`true_rates`), so the same exposures give the same
    outcomes whenever they are read, whatever other customers the frame holds.

    Args:
        exposures: The ledger's exposures (``ActionLedger.exposures_frame``): entity_id, action,
            arm, exposed_at (aware UTC) at least.
        day: The day whose outcomes are wanted (UTC).
        seed: Identifies the simulated world.

    Returns:
        One row per customer whose outcome falls on ``day``, sorted by customer: customer_id,
        occurred_at (aware UTC), retained (1/0), unsubscribed (1/0).

    Raises:
        ValueError: An exposure's (action, arm) has no documented true effect.
    """
    if exposures.empty:
        return _empty_outcomes()
    frame = exposures.assign(
        exposed_at=pd.to_datetime(exposures["exposed_at"], utc=True),
        entity_id=exposures["entity_id"].astype(str),
    )
    first_at = frame.groupby("entity_id", sort=False)["exposed_at"].transform("min")
    first = frame[(frame["exposed_at"] == first_at).to_numpy()]
    if first["entity_id"].duplicated().any():
        # Ties on the time (one run exposes a customer once per action) break by name, not by
        # the order the ledger happened to return.
        first = first.sort_values(["action", "arm"], kind="stable").drop_duplicates("entity_id")
    delay = outcome_delay_days(first["entity_id"], seed=seed)
    # Half a day short of the k-th day: never on the exposure's instant, never on the window's
    # end (the analysis counts outcomes at less than the window after the exposure).
    occurred = first["exposed_at"] + pd.to_timedelta(delay - 0.5, unit="D")
    start = pd.Timestamp(day, tz="UTC")
    due = ((occurred >= start) & (occurred < start + pd.Timedelta(days=1))).to_numpy()
    first, occurred = first[due], occurred[due]
    if first.empty:
        return _empty_outcomes()
    first = first.reset_index(drop=True)
    pairs = first["action"].astype(str) + "\x1f" + first["arm"].astype(str)
    truth = {pair: true_rates(*pair.split("\x1f", 1)) for pair in pairs.drop_duplicates().tolist()}
    p_retained = pairs.map({pair: rates[0] for pair, rates in truth.items()}).to_numpy(float)
    p_unsubscribed = pairs.map({pair: rates[1] for pair, rates in truth.items()}).to_numpy(float)
    retained = _uniforms(seed, first["entity_id"], first["arm"], "retained") < p_retained
    unsubscribed = _uniforms(seed, first["entity_id"], first["arm"], "unsubscribed")
    outcomes = pd.DataFrame(
        {
            "customer_id": first["entity_id"].astype("str"),
            "occurred_at": occurred.reset_index(drop=True).astype("datetime64[ns, UTC]"),
            "retained": retained.astype(np.int64),
            "unsubscribed": (unsubscribed < p_unsubscribed).astype(np.int64),
        }
    )
    return outcomes.sort_values("customer_id", ignore_index=True)


def read_exposures(
    ledger_url: str, *, playbook: str = OUTCOME_PLAYBOOK, day: dt.date | None = None
) -> pd.DataFrame:
    """The playbook's exposures in the ledger, opened for this read and closed after it.

    Args:
        ledger_url: SQLAlchemy URL of the action ledger.
        playbook: The playbook whose exposures are read.
        day: When given, only the customers whose first exposure may have its outcome on
            ``day`` (first exposed in the window before the day's end) are kept, with all their
            exposures, so the first one is known.

    Returns:
        entity_id, action, partition_key, arm, experiment, exposed_at (aware UTC).
    """
    ledger = ActionLedger(ledger_url)
    try:
        exposures = ledger.exposures_frame(playbook)
    finally:
        ledger.dispose()
    if day is None or exposures.empty:
        return exposures
    first = exposures.groupby(exposures["entity_id"].astype(str))["exposed_at"].transform("min")
    start = pd.Timestamp(day, tz="UTC")
    recent = (first >= start - pd.Timedelta(days=OUTCOME_WINDOW_DAYS)) & (
        first < start + pd.Timedelta(days=1)
    )
    return exposures[recent.to_numpy()].reset_index(drop=True)


class ChurnOutcomesConfig(dg.Config):
    """Where the exposures are read from."""

    ledger_url: str = Field(
        default="",
        description=(
            "SQLAlchemy URL of the action ledger; empty reads the churn execution's own "
            "(AUTOEXEC_LEDGER_URL, else the var folder's SQLite file). Pass a URL with a "
            "password through AUTOEXEC_LEDGER_URL, not here: run configuration shows in the UI."
        ),
    )


_OUTCOME_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("customer_id", "string", description="Entity key, e.g. C000123."),
        dg.TableColumn("occurred_at", "timestamp", description="When it was observed (UTC)."),
        dg.TableColumn("retained", "int", description="1: still a customer; 0: churned."),
        dg.TableColumn("unsubscribed", "int", description="1: unsubscribed from email."),
    ]
)


@dg.asset(
    group_name="churn",
    kinds={"pandas"},
    partitions_def=daily_partitions,
    # The outcomes of day D are those of the customers acted on or held out in the 14 days up
    # to it: the lineage from the actions to what they achieved.
    deps=[
        dg.AssetDep(
            dg.AssetKey([OUTCOME_PLAYBOOK, "actions"]),
            partition_mapping=dg.TimeWindowPartitionMapping(
                start_offset=-OUTCOME_WINDOW_DAYS, end_offset=0
            ),
        )
    ],
    metadata={"dagster/column_schema": _OUTCOME_SCHEMA},
)
def churn_outcomes(
    context: dg.AssetExecutionContext, config: ChurnOutcomesConfig
) -> dg.MaterializeResult[pd.DataFrame]:
    """What happened to the customers the churn playbook acted on or held out, as seen on the day.

    Simulated, with known true effects per arm (``TRUE_RETENTION_LIFT``): each customer's
    outcome (retained, unsubscribed) is observed once, 0.5 to 13.5 days after its first exposure.
    """
    day = dt.date.fromisoformat(context.partition_key)
    # Opened here, on use: building the definitions must not touch a database.
    exposures = read_exposures(config.ledger_url or default_ledger_url(), day=day)
    outcomes = simulate_churn_outcomes(exposures, day)
    n = len(outcomes)
    return dg.MaterializeResult(
        value=outcomes,
        metadata={
            "dagster/row_count": dg.MetadataValue.int(n),
            "customers_exposed_in_window": dg.MetadataValue.int(
                int(exposures["entity_id"].nunique()) if not exposures.empty else 0
            ),
            "retained_rate": dg.MetadataValue.float(
                float(outcomes["retained"].mean()) if n else 0.0
            ),
            "unsubscribed_rate": dg.MetadataValue.float(
                float(outcomes["unsubscribed"].mean()) if n else 0.0
            ),
        },
    )
