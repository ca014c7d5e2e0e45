"""The Jinja2 sandbox shared by the channels."""

import pytest

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.channels.templates import (
    compile_template,
    render,
    request_context,
    row_context,
)
from autoexec_dagster.errors import ChannelConfigError


def test_renders_row_values_without_escaping_text() -> None:
    template = compile_template("Hi {{ name }} <{{ tier | upper }}>", what="subject")
    assert render(template, {"name": "Ann & Bo", "tier": "gold"}, what="subject") == (
        "Hi Ann & Bo <GOLD>"
    )


def test_html_templates_escape_values() -> None:
    template = compile_template("<p>{{ name }}</p>", what="body", html=True)
    assert render(template, {"name": "<script>"}, what="body") == "<p>&lt;script&gt;</p>"


def test_compiled_templates_are_cached() -> None:
    first = compile_template("{{ a }}", what="x")
    assert compile_template("{{ a }}", what="y") is first
    assert compile_template("{{ a }}", what="x", html=True) is not first


def test_syntax_error_names_the_template_and_line() -> None:
    with pytest.raises(
        ChannelConfigError, match=r"EmailChannel subject: template syntax error at line 2"
    ):
        compile_template("ok\n{{ name ", what="EmailChannel subject")


def test_undefined_variable_is_an_error_not_blank_text() -> None:
    template = compile_template("Hi {{ nmae }}", what="subject")
    with pytest.raises(
        ChannelConfigError, match=r"subject, row 3: undefined variable: 'nmae' is undefined"
    ):
        render(template, {"name": "Ann"}, what="subject, row 3")


def test_missing_attribute_is_an_error() -> None:
    template = compile_template("{{ customer.nmae }}", what="body")
    with pytest.raises(ChannelConfigError, match=r"undefined variable: .*nmae"):
        render(template, {"customer": {"name": "Ann"}}, what="body")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ '{0.__class__}'.format(1) }}",
    ],
)
def test_sandbox_refuses_escapes(source: str) -> None:
    template = compile_template(source, what="body")
    with pytest.raises(
        ChannelConfigError, match=r"body: refused by the template sandbox: .*unsafe"
    ):
        render(template, {}, what="body")


def test_sandbox_refuses_mutating_the_row() -> None:
    row = {"items": [1, 2]}
    template = compile_template("{{ items.append(3) }}", what="body")
    with pytest.raises(ChannelConfigError, match="refused by the template sandbox"):
        render(template, row, what="body")
    assert row == {"items": [1, 2]}


def test_runtime_failure_becomes_a_config_error() -> None:
    template = compile_template("{{ total / count }}", what="body")
    with pytest.raises(
        ChannelConfigError, match="body: template failed while rendering: ZeroDivisionError"
    ):
        render(template, {"total": 1, "count": 0}, what="body")


def test_request_context_has_request_fields_and_row() -> None:
    request = ActionRequest(
        idempotency_key="k1",
        entity_id="C1",
        action="email",
        playbook="churn",
        playbook_version="3",
        insight="scores",
        partition_key="2024-05-01",
        rule="at_risk",
        data={"first name": "Ann", "entity_id": 17},
        attempt=2,
    )
    template = compile_template(
        "{{ row['first name'] }}/{{ entity_id }}/{{ partition_key }}/{{ attempt }}", what="t"
    )
    # Request fields win over plan columns of the same name: they are what the ledger records.
    assert render(template, request_context(request), what="t") == "Ann/C1/2024-05-01/2"


def test_row_context_fills_request_fields_for_validation() -> None:
    context = row_context({"entity_id": "C1", "name": "Ann"})
    assert context["entity_id"] == "C1"
    assert context["partition_key"] == "<partition_key>"
    assert context["attempt"] == 1
    assert context["row"]["name"] == "Ann"
