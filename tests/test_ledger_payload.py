"""The ledger's JSON for request data and reply outputs keeps what channels need of each value."""

import datetime as dt
from decimal import Decimal

import numpy as np
import pandas as pd

from autoexec_dagster.ledger import payload


def test_values_keep_their_types_across_the_round_trip():
    when = pd.Timestamp("2026-12-01T10:00:00Z")
    row = {
        "count": np.int64(3),
        "score": np.float64(0.25),
        "flag": np.bool_(True),
        "when": when,
        "day": dt.date(2026, 12, 1),
        "wait": pd.Timedelta(seconds=90),
        "price": Decimal("19.99"),
        "missing": pd.NaT,
        "na": pd.NA,
        "tags": ["a", "b"],
        "nested": {"at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)},
    }
    back = payload.loads(payload.dumps(row))
    assert back == {
        "count": 3,
        "score": 0.25,
        "flag": True,
        "when": when.to_pydatetime(),
        "day": dt.date(2026, 12, 1),
        "wait": dt.timedelta(seconds=90),
        "price": Decimal("19.99"),
        "missing": None,
        "na": None,
        "tags": ["a", "b"],
        "nested": {"at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)},
    }
    assert isinstance(back["count"], int) and isinstance(back["when"], dt.datetime)


def test_empty_payloads_read_as_empty_mappings():
    assert payload.loads(None) == {} and payload.loads("") == {}


def test_outputs_are_bounded():
    small = {"status": "healthy", "cause": "disk_full"}
    assert payload.loads(payload.bounded_output(small)) == small
    huge = {"log": "x" * (payload.MAX_OUTPUT_BYTES + 1), "status": "ok"}
    marker = payload.loads(payload.bounded_output(huge))
    assert marker["_truncated"] is True and marker["keys"] == ["log", "status"]
    assert marker["bytes"] > payload.MAX_OUTPUT_BYTES
    assert payload.bounded_output(None) is None
