"""The action ledger: durable record, outbox and escalation queue."""
