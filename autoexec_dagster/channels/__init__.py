"""Delivery channels: e-mail, signed webhooks, SQL upserts and Python callables.

The public API is re-exported from :mod:`autoexec_dagster`; see :mod:`.base` for the contract.
"""
