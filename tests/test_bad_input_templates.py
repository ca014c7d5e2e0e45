"""Jinja2 sandbox escapes in channel templates: each known payload is refused with a clear
ChannelConfigError before anything is recorded, and the SMTP sink and the SQL table stay empty.

(WebhookChannel has no templates: its body is the plan's columns as JSON.)
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from autoexec_dagster import ActionLedger, Channel, ChannelConfigError, EmailChannel, SqlChannel
from tests.bad_input_support import Corpus, action_states, corpus_fixture, run
from tests.receivers import SmtpSink

PAYLOADS: list[tuple[str, str]] = [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox"),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", "sandbox"),
    ("{{ joiner.__init__.__globals__ }}", "sandbox"),
    ("{{ namespace.__init__.__globals__ }}", "sandbox"),
    ("{{ self.__init__.__globals__ }}", "sandbox"),
    ("{{ self._TemplateReference__context }}", "sandbox"),
    ("{{ request.application.__globals__ }}", "'request' is undefined"),
    ("{{ config.items() }}", "'config' is undefined"),
    ("{{ lipsum.__globals__ }}", "sandbox"),
    ("{{ name|attr('__class__') }}", "sandbox"),
    ("{{ name|attr('__cl' ~ 'ass__') }}", "sandbox"),
    ("{{ row|attr('\\x5f\\x5fclass\\x5f\\x5f') }}", "sandbox"),
    ("{{ name['__class__'] }}", "sandbox"),
    ("{{ '{0.__class__}'.format(name) }}", "sandbox"),
    ("{{ '{x.__class__}'.format_map({'x': name}) }}", "sandbox"),
    ("{{ '%s'|format(name.__class__) }}", "sandbox"),
    ("{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}", "sandbox"),
    ("{% set f = name.__add__ %}{{ f('x') }}", "sandbox"),
    ("{{ name.translate.__self__ }}", "sandbox"),
    ("{{ row.update({'email': 'victim@evil.test'}) }}", "sandbox"),
    ("{{ row.pop('email') }}", "sandbox"),
    ("{{ range(10**10)|list }}", "Range too big"),
]


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    with corpus_fixture("template_sandbox") as c:
        yield c


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ActionLedger]:
    led = ActionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.dispose()


def _sql_target(tmp_path: Path) -> tuple[str, sa.Table]:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    meta = sa.MetaData()
    table = sa.Table(
        "tasks",
        meta,
        sa.Column("idempotency_key", sa.String, primary_key=True),
        sa.Column("note", sa.Text),
    )
    engine = sa.create_engine(url)
    meta.create_all(engine)
    engine.dispose()
    return url, table


def _rows(url: str, table: sa.Table) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return len(conn.execute(sa.select(table)).all())
    finally:
        engine.dispose()


@pytest.mark.parametrize("where", ["email subject", "email body", "email html", "sql column"])
@pytest.mark.parametrize(("payload", "problem"), PAYLOADS)
def test_sandbox_escape_is_refused_and_nothing_is_sent(
    payload: str,
    problem: str,
    where: str,
    sink: SmtpSink,
    ledger: ActionLedger,
    tmp_path: Path,
    corpus: Corpus,
) -> None:
    url, table = _sql_target(tmp_path)
    ch: Channel
    if where == "sql column":
        ch = SqlChannel(url=url, table="tasks", columns={"note": payload})
    else:
        fields = {"subject": "Hello", "template": "Hi", "html_template": None}
        fields[
            {"email subject": "subject", "email body": "template"}.get(where, "html_template")
        ] = payload
        ch = EmailChannel(
            host=sink.host,
            port=sink.port,
            sender="care@example.com",
            to_column="email",
            subject=fields["subject"] or "",
            template=fields["template"] or "",
            html_template=fields["html_template"],
        )
    with corpus.case():
        before = len(sink.messages)
        with pytest.raises(ChannelConfigError, match=problem):
            run(ch, ledger)
        assert len(sink.messages) == before
        assert _rows(url, table) == 0
        assert action_states(ledger) == []


def test_the_same_channels_deliver_a_harmless_template(
    sink: SmtpSink, ledger: ActionLedger, tmp_path: Path
) -> None:
    # The control: the refusals above come from the payloads, not from the set-up.
    url, table = _sql_target(tmp_path)
    before = len(sink.messages)
    email = EmailChannel(
        host=sink.host,
        port=sink.port,
        sender="care@example.com",
        to_column="email",
        subject="Hello {{ name }}",
        template="Hi {{ name|upper }}",
    )
    assert run(email, ledger).succeeded == 2
    assert len(sink.messages) == before + 2
    other = ActionLedger(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        assert (
            run(SqlChannel(url=url, table="tasks", columns={"note": "{{ name }}"}), other).succeeded
            == 2
        )
    finally:
        other.dispose()
    assert _rows(url, table) == 2
