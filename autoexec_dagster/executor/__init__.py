"""The executor: drives channels over a plan with the ledger as the outbox."""
