"""The churn pipeline of the reference deployment: customers, a churn model and daily churn scores.

Everything here is generated, so the demo runs anywhere without data, but the data is not random
noise: a hidden churn propensity (a logistic function of the customer's features plus noise) decides
who churned in the training snapshot, so the model learns a real relationship and its scores on a
new day rank customers the way the propensity does.

Assets:
    raw_customers: a training snapshot of customers with a ``churned`` label (not partitioned).
    churn_model: a scikit-learn pipeline trained on ``raw_customers`` with a held-out split.
    churn_scores: one row per customer per day (daily partitions); the insight the churn playbook
        acts on.

Tuning (measured with the defaults below, see tests/test_reference_assets.py): of 20,000 customers
in a daily partition about 1,000 score ``churn_score >= 0.5``; with the rules of
``resources/churn_playbook.yaml`` about 5% of those are escalated to a person (high value, or a
score so close to the flag threshold that the model cannot be trusted either way).
"""

import datetime as dt
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import precision_score, recall_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

PARTITIONS_START = "2026-11-01"
# The training snapshot is taken the day before the first scored partition.
SNAPSHOT_DATE = dt.date(2026, 10, 31)
TRAINING_CUSTOMERS = 50_000
DAILY_CUSTOMERS = 20_000
# Different seeds: the scored customers are not the ones the model was trained on.
TRAINING_SEED = 7
SCORING_SEED = 2026
FLAG_THRESHOLD = 0.5

PLANS = ("basic", "standard", "premium")
PLAN_SHARES = (0.5, 0.35, 0.15)
PLAN_CHARGE_RANGE = {"basic": (19.0, 39.0), "standard": (49.0, 79.0), "premium": (99.0, 149.0)}
REGIONS = ("NA", "EMEA", "APAC", "LATAM")
REGION_SHARES = (0.4, 0.3, 0.2, 0.1)
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
    """Coefficients of the hidden churn propensity (log-odds, per unit of each feature).

    The generator's only knob on the flagged share: the intercept moves the whole population, the
    slopes decide how well the features separate churners from the rest.
    """

    intercept: float = -2.6
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

    Who the customers are (id, name, email, plan, region, signup date, engagement) depends only on
    ``seed``; how they behave (usage trend, tickets, last login) is redrawn for each ``as_of`` from
    ``(seed, as_of)``. The same arguments always give the same frame.

    Args:
        n: Number of customers.
        seed: Identifies the population.
        as_of: The day the features describe.
        snapshot_date: Signup dates are drawn back from this day, so they stay fixed as ``as_of``
            moves forward.

    Returns:
        One row per customer: customer_id, name, email, signup_date, tenure_months, plan,
        monthly_charge, usage_trend, support_tickets_90d, last_login_days, lifetime_value, region.
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
    # Static engagement, plus a minority drifting away: the daily behaviour follows both.
    engagement = who.normal(0.0, 1.0, size=n)
    drifting = who.random(n) < 0.07
    ltv_factor = who.uniform(0.95, 1.15, size=n)

    ids = np.arange(1, n + 1)
    customer_id = pd.Series(ids).map("C{:06d}".format)
    name = pd.Series(first) + " " + pd.Series(last)
    email = (
        pd.Series(first).str.lower()
        + "."
        + pd.Series(last).str.lower()
        + pd.Series(ids).astype(str)
        + "@"
        + pd.Series(domain)
    )
    low = np.select([plan == p for p in PLANS], [PLAN_CHARGE_RANGE[p][0] for p in PLANS])
    high = np.select([plan == p for p in PLANS], [PLAN_CHARGE_RANGE[p][1] for p in PLANS])
    monthly_charge = np.round(low + charge_unit * (high - low), 2)
    signup_date = pd.Timestamp(snapshot_date) - pd.to_timedelta(tenure_days, unit="D")
    age_days = (pd.Timestamp(as_of) - signup_date).days.to_numpy()
    tenure_months = np.maximum(age_days // 30, 0).astype(np.int64)

    usage_trend = np.clip(
        0.05 + 0.08 * engagement - 0.35 * drifting + day.normal(0.0, 0.08, size=n), -1.0, 1.0
    ).round(3)
    tickets = day.poisson(0.5 + 1.6 * drifting + 0.3 * np.maximum(-engagement, 0.0))
    last_login = np.round(
        day.exponential(2.0 + 10.0 * drifting + 2.0 * np.maximum(-engagement, 0.0))
    ).astype(np.int64)
    lifetime_value = np.round(monthly_charge * tenure_months * ltv_factor, 2)

    return pd.DataFrame(
        {
            "customer_id": customer_id.astype("string"),
            "name": name.astype("string"),
            "email": email.astype("string"),
            "signup_date": signup_date.date,
            "tenure_months": tenure_months,
            "plan": pd.Categorical(plan, categories=PLANS),
            "monthly_charge": monthly_charge,
            "usage_trend": usage_trend,
            "support_tickets_90d": tickets.astype(np.int64),
            "last_login_days": last_login,
            "lifetime_value": lifetime_value,
            "region": pd.Categorical(region, categories=REGIONS),
        }
    )


def churn_logit(customers: pd.DataFrame, propensity: Propensity = PROPENSITY) -> np.ndarray:
    """The hidden churn propensity in log-odds, without noise.

    Args:
        customers: Frame from :func:`generate_customers`.
        propensity: Coefficients.

    Returns:
        One log-odds value per customer.
    """
    p = propensity
    plan = customers["plan"].astype(str).to_numpy()
    return (
        p.intercept
        + p.usage_trend * customers["usage_trend"].to_numpy()
        + p.support_tickets_90d * customers["support_tickets_90d"].to_numpy()
        + p.last_login_days * customers["last_login_days"].to_numpy()
        + p.tenure_months * customers["tenure_months"].to_numpy()
        + p.plan_basic * (plan == "basic")
        + p.plan_premium * (plan == "premium")
    )


def generate_training_snapshot(
    n: int = TRAINING_CUSTOMERS, *, seed: int = TRAINING_SEED, as_of: dt.date = SNAPSHOT_DATE
) -> pd.DataFrame:
    """Generate customers with a ``churned`` label drawn from the hidden propensity.

    Args:
        n: Number of customers.
        seed: Identifies the population (and the label draw).
        as_of: The day of the snapshot.

    Returns:
        The frame of :func:`generate_customers` plus a boolean ``churned`` column.
    """
    customers = generate_customers(n, seed=seed, as_of=as_of)
    labels = _rng(seed, as_of.toordinal(), 1)
    logit = churn_logit(customers) + labels.normal(0.0, PROPENSITY.noise_sd, size=n)
    customers["churned"] = labels.random(n) < 1.0 / (1.0 + np.exp(-logit))
    return customers
