"""Jinja2 templates for channels, rendered in a sandbox.

Channel templates (email subjects and bodies, SQL column values) are written by whoever configures
the playbook and filled with plan data, so they run in Jinja2's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`: no access to dunder attributes, no calls
that mutate the row, bounded ``range``. Undefined variables raise instead of rendering as empty
text (:class:`~jinja2.StrictUndefined`), so a typo in a column name stops the batch at validation
rather than sending a blank e-mail.

The variables a template sees are the plan row's columns, the request's identifying fields
(``entity_id``, ``action``, ``playbook``, ``playbook_version``, ``insight``, ``partition_key``,
``rule``, ``idempotency_key``, ``attempt``) and ``row``, the whole mapping, for column names that are
not identifiers (``{{ row["first name"] }}``).
"""

import functools
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from autoexec_dagster.channels.base import ActionRequest
from autoexec_dagster.errors import ChannelConfigError

# Fields of ActionRequest that templates may use besides the plan row's own columns.
REQUEST_FIELDS: tuple[str, ...] = (
    "idempotency_key",
    "entity_id",
    "action",
    "playbook",
    "playbook_version",
    "insight",
    "partition_key",
    "rule",
    "attempt",
)

# Immutable: a template must not be able to change the row other channels and the ledger read.
_TEXT_ENV = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
)
_HTML_ENV = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True
)


@functools.lru_cache(maxsize=512)
def _compile(source: str, html: bool) -> jinja2.Template:
    # Failures raise and are therefore not cached; only good templates are.
    return (_HTML_ENV if html else _TEXT_ENV).from_string(source)


def compile_template(source: str, *, what: str, html: bool = False) -> jinja2.Template:
    """Compile a template in the sandbox, reusing an earlier compilation of the same source.

    Args:
        source: The Jinja2 template text.
        what: What the template is, for error messages (``"EmailChannel subject"``).
        html: Autoescape HTML (for HTML e-mail bodies); plain text is not escaped.

    Returns:
        The compiled template.

    Raises:
        ChannelConfigError: The template has a syntax error; the message names ``what`` and the line.
    """
    if not isinstance(source, str):
        raise ChannelConfigError(f"{what}: template must be a string, got {type(source).__name__}")
    try:
        return _compile(source, html)
    except jinja2.TemplateSyntaxError as exc:
        raise ChannelConfigError(
            f"{what}: template syntax error at line {exc.lineno}: {exc.message}"
        ) from exc


def render(template: jinja2.Template, row: Mapping[str, Any], *, what: str) -> str:
    """Render a compiled template with the given variables.

    Args:
        template: A template from :func:`compile_template`.
        row: The variables, usually from :func:`request_context` or :func:`row_context`.
        what: What is being rendered, for error messages (include the row or entity).

    Returns:
        The rendered text.

    Raises:
        ChannelConfigError: A variable is undefined, the sandbox refused an operation, or the
            template failed while rendering; the message names ``what`` and the problem.
    """
    try:
        return template.render(row)
    except SecurityError as exc:
        raise ChannelConfigError(f"{what}: refused by the template sandbox: {exc}") from exc
    except jinja2.UndefinedError as exc:
        raise ChannelConfigError(f"{what}: undefined variable: {exc.message}") from exc
    except jinja2.TemplateError as exc:
        raise ChannelConfigError(f"{what}: template error: {exc}") from exc
    except Exception as exc:
        # Arithmetic on bad data, a filter given the wrong type: still a template failure that
        # must stop the batch with a clear message rather than escape as a bare exception.
        raise ChannelConfigError(
            f"{what}: template failed while rendering: {type(exc).__name__}: {exc}"
        ) from exc


def request_context(request: ActionRequest) -> dict[str, Any]:
    """Template variables for one request: its plan row plus its identifying fields."""
    context = dict(request.data)
    context.update(
        idempotency_key=request.idempotency_key,
        entity_id=request.entity_id,
        action=request.action,
        playbook=request.playbook,
        playbook_version=request.playbook_version,
        insight=request.insight,
        partition_key=request.partition_key,
        rule=request.rule,
        attempt=request.attempt,
    )
    context.setdefault("row", dict(context))
    return context


def row_context(row: Mapping[Any, Any]) -> dict[str, Any]:
    """Template variables for validating one plan row before any request exists.

    Request fields the plan does not carry as columns get a placeholder (``attempt`` gets 1), so
    validation renders the same variables a send will.
    """
    # DataFrame records are keyed by column labels; templates address them as strings.
    context = {str(key): value for key, value in row.items()}
    for name in REQUEST_FIELDS:
        if name not in context:
            context[name] = 1 if name == "attempt" else f"<{name}>"
    context.setdefault("row", dict(context))
    return context
