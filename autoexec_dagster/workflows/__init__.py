"""Durable multi-step workflows: per-entity steps whose state lives in the ledger."""
