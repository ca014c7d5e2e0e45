"""The demo's local destinations: the SMTP mailbox and the signed-webhook CRM."""

import asyncio
import email.message
import email.parser
import email.policy
import json
import os
import selectors
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoexec_dagster.channels.webhook import sign
from resources.local_receivers import CrmReceiver, SmtpSink, mailbox_filename
from resources.local_servers import BackgroundServer

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REPO = Path(__file__).resolve().parents[1]


def _message(message_id: str, subject: str) -> email.message.EmailMessage:
    message = email.message.EmailMessage()
    message["From"] = "retention@example.com"
    message["To"] = "ava.smith1@example.com"
    message["Subject"] = subject
    message["Message-ID"] = message_id
    message.set_content("We miss you, Ava.")
    return message


def _post(
    url: str,
    body: bytes,
    *,
    webhook_id: str,
    secret: str = SECRET,
    timestamp: int | None = None,
    signed_body: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST a Standard Webhooks request; sign ``signed_body`` (default: ``body``)."""
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, webhook_id, ts, signed_body or body),
    }
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _get_count(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return int(json.loads(response.read())["count"])


@pytest.fixture
def crm(tmp_path: Path) -> Iterator[CrmReceiver]:
    with CrmReceiver(SECRET, tmp_path / "crm.sqlite") as receiver:
        yield receiver


def test_mailbox_filename_is_stable_safe_and_collision_free() -> None:
    assert mailbox_filename("<ak-1f3a@autoexec>", b"") == "ak-1f3a@autoexec.eml"
    assert mailbox_filename("ak-1f3a@autoexec", b"x") == "ak-1f3a@autoexec.eml"
    hostile = mailbox_filename("<../../etc/passwd>", b"")
    assert "/" not in hostile and not hostile.startswith(".")
    # Both sanitise to the same characters; the hash suffix keeps them apart.
    assert mailbox_filename("<a/b@x>", b"") != mailbox_filename("<a\\b@x>", b"")
    assert mailbox_filename(None, b"one") != mailbox_filename(None, b"two")
    assert mailbox_filename(None, b"one") == mailbox_filename("", b"one")


def test_smtp_sink_files_one_eml_per_message_id(tmp_path: Path) -> None:
    mailbox = tmp_path / "mailbox"
    with SmtpSink(mailbox) as sink:
        assert sink.host == "127.0.0.1" and sink.port > 0
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.send_message(_message("<key-1@autoexec>", "first attempt"))
            client.send_message(_message("<key-2@autoexec>", "another customer"))
            # A retry after a lost reply: same Message-ID, so it must replace, not add.
            client.send_message(_message("<key-1@autoexec>", "redelivered"))
        assert sink.deliveries == 3
        assert sink.redeliveries == 1
        files = sink.mailbox_files()
        # What the tests assert on is kept as well: every accepted message, in arrival order.
        assert [m.message["Subject"] for m in sink.messages] == [
            "first attempt",
            "another customer",
            "redelivered",
        ]
    assert [f.name for f in files] == ["key-1@autoexec.eml", "key-2@autoexec.eml"]
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(files[0].read_bytes())
    assert parsed["Subject"] == "redelivered"
    assert parsed["To"] == "ava.smith1@example.com"
    assert not list(mailbox.glob(".*partial"))


def test_smtp_sink_stops_and_frees_its_port(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "mailbox").start()
    port = sink.port
    assert sink.running
    sink.stop()
    sink.stop()
    assert not sink.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_start_reports_a_port_in_use(tmp_path: Path) -> None:
    with SmtpSink(tmp_path / "a") as first, pytest.raises(OSError):
        SmtpSink(tmp_path / "b", port=first.port).start()


class _BrokenServer(BackgroundServer):
    name = "broken"

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def _open(self, sock: socket.socket) -> None:
        raise LookupError("cannot serve")

    async def _close(self) -> None:
        self.closed += 1


def test_a_server_that_fails_to_open_raises_in_start_and_releases_its_port() -> None:
    server = _BrokenServer()
    with pytest.raises(LookupError, match="cannot serve"):
        server.start()
    assert server.closed == 1 and not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    server.stop()  # nothing to stop: no error


def test_a_stopped_server_starts_again() -> None:
    sink = SmtpSink()
    with sink, smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.send_message(_message("<key-1@autoexec>", "before"))
    with sink, smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.send_message(_message("<key-1@autoexec>", "after"))
    # Without a mailbox nothing is filed; the same Message-ID still counts as a redelivery.
    assert sink.mailbox_files() == []
    assert (sink.deliveries, sink.redeliveries, len(sink.messages)) == (2, 1, 2)


def test_crm_creates_a_signed_task_once_and_refuses_tampering(crm: CrmReceiver) -> None:
    payload = {"entity_id": "C000123", "action": "crm_task", "reason": "watch"}
    body = json.dumps(payload).encode()

    status, answer = _post(crm.url, body, webhook_id="ak-123")
    assert (status, answer["status"]) == (201, "created")
    task_id = answer["task_id"]

    tampered = json.dumps({**payload, "entity_id": "C999999"}).encode()
    assert _post(crm.url, tampered, webhook_id="ak-124", signed_body=body)[0] == 401
    assert _post(crm.url, body, webhook_id="ak-125", secret="whsec_" + "QUJD" * 8)[0] == 401
    stale = int(time.time()) - 3600
    assert _post(crm.url, body, webhook_id="ak-126", timestamp=stale)[0] == 401

    # A redelivery is signed afresh (new timestamp) but carries the same webhook-id.
    status, answer = _post(crm.url, body, webhook_id="ak-123", timestamp=int(time.time()) + 1)
    assert (status, answer) == (200, {"status": "duplicate", "task_id": task_id})

    assert _get_count(crm.url) == 1
    assert crm.task_count() == 1
    assert crm.counts == {"created": 1, "duplicates": 1, "rejected": 3}
    with sqlite3.connect(crm.db_path) as db:
        row = db.execute("SELECT webhook_id, entity_id, action, payload FROM crm_tasks").fetchone()
    assert row[:3] == ("ak-123", "C000123", "crm_task")
    assert json.loads(row[3]) == payload


def test_crm_refuses_a_body_that_is_not_a_json_object(crm: CrmReceiver) -> None:
    assert _post(crm.url, b"[1, 2]", webhook_id="ak-1")[0] == 400
    assert _post(crm.url, b"not json", webhook_id="ak-2")[0] == 400
    assert crm.task_count() == 0


def test_crm_refuses_a_malformed_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="base64"):
        CrmReceiver("whsec_not*base64", tmp_path / "crm.sqlite")
    with pytest.raises(ValueError, match="empty"):
        CrmReceiver("whsec_", tmp_path / "crm.sqlite")
    # Unpadded base64 is the same key as padded.
    assert sign("whsec_QUI", "m", 1, b"") == sign("whsec_QUI=", "m", 1, b"")


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError("the receivers printed nothing")
    return proc.stdout.readline()


def test_standalone_process_serves_both_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "CRM_WEBHOOK_SECRET": SECRET}
    command = [
        sys.executable,
        "-m",
        "resources.local_receivers",
        "--smtp-port=0",
        "--crm-port=0",
        f"--mailbox={tmp_path / 'mailbox'}",
        f"--crm-db={tmp_path / 'crm.sqlite'}",
    ]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready = json.loads(_read_line(proc, timeout=30))
        with smtplib.SMTP("127.0.0.1", ready["smtp_port"], timeout=10) as client:
            client.send_message(_message("<key-9@autoexec>", "hello"))
        body = b'{"entity_id": "C000009", "action": "crm_task"}'
        assert _post(ready["crm_url"], body, webhook_id="ak-9")[0] == 201
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "RuntimeWarning" not in stderr
    assert (tmp_path / "mailbox" / "key-9@autoexec.eml").exists()
    with sqlite3.connect(tmp_path / "crm.sqlite") as db:
        assert db.execute("SELECT count(*) FROM crm_tasks").fetchone()[0] == 1


def test_standalone_process_needs_the_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CRM_WEBHOOK_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "resources.local_receivers", "--smtp-port=0", "--crm-port=0"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "CRM_WEBHOOK_SECRET" in result.stderr


def test_standalone_process_stops_when_its_owner_exits(tmp_path: Path) -> None:
    # The launcher starts the receivers and exits at once. The receivers inherit the stdout pipe,
    # so reading it to the end returns exactly when they have exited too.
    launcher = (
        "import os, subprocess, sys; subprocess.Popen([sys.executable, '-m', "
        "'resources.local_receivers', '--smtp-port=0', '--crm-port=0', "
        f"'--mailbox={tmp_path / 'mailbox'}', '--crm-db={tmp_path / 'crm.sqlite'}', "
        "f'--owner-pid={os.getpid()}'])"
    )
    env = {**os.environ, "CRM_WEBHOOK_SECRET": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.wait(timeout=30) == 0
    lines = []
    deadline = time.monotonic() + 30
    while line := _read_line(proc, timeout=max(deadline - time.monotonic(), 0.0)):
        lines.append(line)
    ready = json.loads(lines[0])
    assert ready["smtp_port"] > 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ready["crm_port"]), timeout=5).close()


def test_library_channels_deliver_each_action_once(tmp_path: Path) -> None:
    # The demo wires the library's channels to these receivers; a redelivery with the same
    # idempotency key must reach each of them as the same message.
    base = pytest.importorskip("autoexec_dagster.channels.base")
    webhook = pytest.importorskip("autoexec_dagster.channels.webhook")
    mail = pytest.importorskip("autoexec_dagster.channels.email")

    def request(key: str) -> Any:
        return base.ActionRequest(
            idempotency_key=key,
            entity_id="C000123",
            action="crm_task",
            playbook="churn_outreach",
            playbook_version="v1",
            insight="churn_scores",
            partition_key="2026-11-01",
            rule="watch",
            data={"customer_id": "C000123", "email": "ava.smith1@example.com", "name": "Ava"},
        )

    async def deliver(crm: CrmReceiver, sink: SmtpSink) -> list[str]:
        tasks = webhook.WebhookChannel(url=crm.url, secret=SECRET, allowed_hosts=["127.0.0.1"])
        emails = mail.EmailChannel(
            host="127.0.0.1",
            port=sink.port,
            sender="Retention <retention@example.com>",
            to_column="email",
            subject="We miss you, {{ name }}",
            template="Hello {{ name }}",
        )
        receipts = []
        async with tasks.open_sender() as sender:
            replies = [await sender.send(request(k)) for k in ("k1", "k1", "k2")]
            # The CRM answers with the task it created; the channel keeps it as the output.
            ids = [r.output["task_id"] for r in replies if r.output]
            assert len(ids) == 3 and ids[0] == ids[1] != ids[2]
            receipts += [base.as_delivered(r).receipt for r in replies]
        async with emails.open_sender() as sender:
            receipts += [
                base.as_delivered(await sender.send(request(k))).receipt for k in ("k1", "k1")
            ]
        return receipts

    with CrmReceiver(SECRET, tmp_path / "crm.sqlite") as crm, SmtpSink(tmp_path / "mb") as sink:
        receipts = asyncio.run(deliver(crm, sink))
        assert receipts[:3] == ["HTTP 201", "HTTP 200", "HTTP 201"]
        assert crm.task_count() == 2
        assert sink.deliveries == 2 and len(sink.mailbox_files()) == 1
