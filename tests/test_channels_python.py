"""PythonChannel: user functions, sync and async, and how their failures are classified."""

import asyncio
import threading
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.channels.python import PythonChannel
from autoexec_dagster.errors import (
    ChannelConfigError,
    ChannelError,
    PermanentChannelError,
    TransientChannelError,
)
from tests.channel_doubles import send_all

DELIVERED: list[str] = []
NOT_CALLABLE = 42


class RejectedByCrm(Exception):
    """What a client library might raise for a request it will never accept."""


def deliver(request: ActionRequest) -> str:
    """An importable synchronous delivery function."""
    DELIVERED.append(request.idempotency_key)
    return f"crm task for {request.entity_id}"


async def deliver_async(request: ActionRequest) -> None:
    """An importable async delivery function that returns no receipt."""
    await asyncio.sleep(0)
    DELIVERED.append(request.idempotency_key)


def make_request(key: str, **data: Any) -> ActionRequest:
    return ActionRequest(
        idempotency_key=key,
        entity_id=f"E-{key}",
        action="crm_task",
        playbook="churn",
        playbook_version="1",
        insight="churn_scores",
        partition_key="2024-05-01",
        rule="watch",
        data=data,
    )


def test_sync_function_by_import_path() -> None:
    DELIVERED.clear()
    ch = PythonChannel(function="tests.test_channels_python:deliver")
    ch.validate_rows(pd.DataFrame())
    assert send_all(ch, [make_request("k1")]) == ["crm task for E-k1"]
    assert DELIVERED == ["k1"]


def test_async_function_without_receipt() -> None:
    DELIVERED.clear()
    ch = PythonChannel(function="tests.test_channels_python:deliver_async")
    assert send_all(ch, [make_request("k1"), make_request("k2")]) == ["ok", "ok"]
    assert sorted(DELIVERED) == ["k1", "k2"]


def test_from_callable_with_a_module_function_stores_its_import_path() -> None:
    ch = PythonChannel.from_callable(deliver)
    assert ch.function == "tests.test_channels_python:deliver"


def test_sync_functions_run_concurrently_in_threads() -> None:
    # Every call waits at the barrier until all eight are running at once; run one at a time,
    # the barrier would time out and the calls would fail.
    barrier = threading.Barrier(8, timeout=10)
    threads: set[str] = set()

    def wait_for_all(request: ActionRequest) -> str:
        threads.add(threading.current_thread().name)
        barrier.wait()
        return request.idempotency_key

    ch = PythonChannel.from_callable(wait_for_all, max_concurrency=8)
    results = send_all(ch, [make_request(f"k{i}") for i in range(8)])
    assert results == [f"k{i}" for i in range(8)]
    assert len(threads) == 8
    assert all(name.startswith("autoexec-python") for name in threads)


def test_callable_object_with_async_call() -> None:
    class Client:
        async def __call__(self, request: ActionRequest) -> str:
            return "async " + request.entity_id

    assert send_all(PythonChannel.from_callable(Client()), [make_request("k")]) == ["async E-k"]


def test_other_exceptions_are_transient() -> None:
    def flaky(request: ActionRequest) -> str:
        raise ConnectionResetError("peer reset")

    [result] = send_all(PythonChannel.from_callable(flaky), [make_request("k")])
    assert isinstance(result, TransientChannelError)
    assert "ConnectionResetError: peer reset" in str(result)


def test_channel_errors_pass_through() -> None:
    async def refuse(request: ActionRequest) -> str:
        raise PermanentChannelError("CRM says the customer is closed")

    def slow_down(request: ActionRequest) -> str:
        raise TransientChannelError("busy", retry_after=3)

    [refused] = send_all(PythonChannel.from_callable(refuse), [make_request("k")])
    [later] = send_all(PythonChannel.from_callable(slow_down), [make_request("k")])
    assert isinstance(refused, PermanentChannelError)
    assert str(refused) == "CRM says the customer is closed"
    assert isinstance(later, TransientChannelError)
    assert later.retry_after == 3


@pytest.mark.parametrize(
    "names", [["RejectedByCrm"], ["tests.test_channels_python.RejectedByCrm"], ["Exception"]]
)
def test_permanent_errors_by_class_name(names: list[str]) -> None:
    def reject(request: ActionRequest) -> str:
        raise RejectedByCrm("invalid account")

    ch = PythonChannel.from_callable(reject, permanent_errors=names)
    [result] = send_all(ch, [make_request("k")])
    assert isinstance(result, PermanentChannelError)
    assert "RejectedByCrm: invalid account" in str(result)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("tests.test_channels_python.deliver", "must look like 'package.module:attribute'"),
        ("tests.no_such_module:deliver", "cannot import module 'tests.no_such_module'"),
        ("tests.test_channels_python:nope", "has no attribute 'nope'"),
        ("tests.test_channels_python:NOT_CALLABLE", "is a int, not a callable"),
    ],
)
def test_bad_function_path(path: str, problem: str) -> None:
    ch = PythonChannel(function=path)
    with pytest.raises(ChannelConfigError, match=problem):
        ch.validate_rows(pd.DataFrame())
    with pytest.raises(ChannelConfigError, match=problem):
        send_all(ch, [])


def test_no_function_configured() -> None:
    with pytest.raises(ChannelConfigError, match="no function configured"):
        PythonChannel().validate_rows(pd.DataFrame())


def test_from_callable_refuses_a_non_callable() -> None:
    with pytest.raises(ChannelConfigError, match="needs a callable"):
        PythonChannel.from_callable("tests:deliver")  # type: ignore[arg-type]


def test_from_callable_survives_dagster_rebuilding_the_resource() -> None:
    calls: list[str] = []
    first = PythonChannel.from_callable(lambda r: calls.append("first") or "1")
    second = PythonChannel.from_callable(lambda r: calls.append("second") or "2")
    assert first.function != second.function
    receipts: list[str | ChannelError] = []
    for resource in (first, second):
        with dg.build_resources({"channel": resource}) as resources:
            rebuilt = resources.channel
            # Dagster hands out a copy built from the config; the private callable is gone.
            assert rebuilt is not resource
            assert rebuilt._callable is None
            receipts.extend(send_all(rebuilt, [make_request("k")]))
    assert receipts == ["1", "2"]
    assert calls == ["first", "second"]
