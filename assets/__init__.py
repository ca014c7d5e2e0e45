"""Assets of the reference deployment, one module per story: churn (``assets.customers``) and host
remediation (``assets.hosts``), the model outputs the library acts on."""

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
from assets.hosts import (
    ANOMALY_THRESHOLD,
    FAULT_KINDS,
    HostAnomalyModel,
    fault_of,
    generate_host_metrics,
    host_anomalies,
    host_anomaly_model,
    host_inventory,
    host_metrics_history,
    hourly_partitions,
    injected_faults,
    score_hosts,
    train_host_anomaly_model,
)

churn_assets = [raw_customers, churn_model, churn_scores]
host_assets = [host_metrics_history, host_anomaly_model, host_anomalies]

__all__ = [
    "ANOMALY_THRESHOLD",
    "DAILY_CUSTOMERS",
    "FAULT_KINDS",
    "FEATURES",
    "FLAG_THRESHOLD",
    "TRAINING_CUSTOMERS",
    "HostAnomalyModel",
    "churn_assets",
    "churn_model",
    "churn_scores",
    "daily_partitions",
    "fault_of",
    "generate_customers",
    "generate_host_metrics",
    "generate_training_snapshot",
    "host_anomalies",
    "host_anomaly_model",
    "host_assets",
    "host_inventory",
    "host_metrics_history",
    "hourly_partitions",
    "injected_faults",
    "mask_email",
    "raw_customers",
    "score_customers",
    "score_hosts",
    "train_churn_model",
    "train_host_anomaly_model",
]
