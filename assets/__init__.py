"""Assets of the reference deployment: the churn pipeline whose scores the library acts on."""

from assets.customers import (
    DAILY_CUSTOMERS,
    FEATURES,
    FLAG_THRESHOLD,
    TRAINING_CUSTOMERS,
    churn_model,
    churn_scores,
    daily_partitions,
    generate_customers,
    generate_training_snapshot,
    mask_email,
    raw_customers,
    score_customers,
    train_churn_model,
)

churn_assets = [raw_customers, churn_model, churn_scores]

__all__ = [
    "DAILY_CUSTOMERS",
    "FEATURES",
    "FLAG_THRESHOLD",
    "TRAINING_CUSTOMERS",
    "churn_assets",
    "churn_model",
    "churn_scores",
    "daily_partitions",
    "generate_customers",
    "generate_training_snapshot",
    "mask_email",
    "raw_customers",
    "score_customers",
    "train_churn_model",
]
