"""The campaign-optimisation story's variants: a grid of subject lines by calls to action, and the
truth the simulated audience reacts by.

:func:`variant_grid` builds the variants of the playbook's experiment
(``resources/campaign_playbook.yaml``): one per subject line and call to action, named
``s<i>_cta<j>`` (1-based), each overriding the email channel's ``subject``, ``template`` and
``html_template`` (two subject lines by two calls to action: four variants). The bodies are written once with a placeholder that the grid fills per
variant, ``${call_to_action}`` (``string.Template`` syntax, which leaves the Jinja2 ``{{ ... }}``
of the channel's templates alone); the subject line stays out of the body, so every variant with
the same call to action has the same body (the playbook YAML writes each body once). Each body carries the per-recipient
tracking links the channel adds at send time (:mod:`resources.campaign_channels`):
``{{ tracking_url }}`` (the click), ``{{ unsubscribe_url }}`` and, in the HTML part,
``{{ open_pixel_url }}``.

The truth. :data:`TRUE_CLICK_RATES` is what each variant really achieves: the share of recipients
who click its link, whatever day and campaign. The demo never shows it to the library; it
compares the experiment's decision with it at the end: the true best (:func:`true_best`, one
clear winner, ``s2_cta2`` at +50% over the control ``s1_cta1``) against the promoted variant, and
the true lift (:func:`true_lift`) against the estimated one. :data:`TRUE_OPEN_RATES` is the share who open an
email, by subject line (what people see before opening); the click rates never exceed them.
"""

import string
from collections.abc import Mapping, Sequence

__all__ = [
    "BODY_TEMPLATE",
    "CALLS_TO_ACTION",
    "CONTROL",
    "HTML_TEMPLATE",
    "SUBJECTS",
    "TRUE_CLICK_RATES",
    "TRUE_OPEN_RATES",
    "TRUE_UNSUBSCRIBE_RATE",
    "playbook_variants",
    "true_best",
    "true_lift",
    "variant_grid",
    "variant_name",
]

# Subject lines (Jinja2 over the plan row). Index i gives the variant's `s<i+1>`.
SUBJECTS: tuple[str, ...] = (
    "{{ campaign_name }}: new this week",
    "{{ name.split(' ')[0] }}, we picked these for you",
)
# Calls to action: the sentence the link follows. Index j gives the variant's `cta<j+1>`.
CALLS_TO_ACTION: tuple[str, ...] = (
    "See what is new",
    "Claim your 15% discount",
)
CONTROL = "s1_cta1"

BODY_TEMPLATE = """\
Hi {{ name.split(' ')[0] }},

We put together a few things from {{ campaign_name }} that we think
you will like.

${call_to_action}: {{ tracking_url }}

Thank you for reading,
The Northwind team

--
You receive this email as a subscriber of {{ campaign_name }} ({{ campaign_id }}).
Unsubscribe: {{ unsubscribe_url }}
"""
HTML_TEMPLATE = """\
<html><body>
<p>Hi {{ name.split(' ')[0] }},</p>
<p>We put together a few things from {{ campaign_name }} that we think you will like.</p>
<p><a href="{{ tracking_url }}">${call_to_action}</a></p>
<p>Thank you for reading,<br>The Northwind team</p>
<p style="font-size:small">You receive this email as a subscriber of {{ campaign_name }}
({{ campaign_id }}). <a href="{{ unsubscribe_url }}">Unsubscribe</a></p>
<img src="{{ open_pixel_url }}" width="1" height="1" alt="">
</body></html>
"""

# The truth (see the module docstring). The control clicks at 8%; the personal subject line
# with the discount is the one clear winner (+50%); each alone does a little worse than the
# control (a discount under an impersonal subject reads as spam, a personal subject over "see
# what is new" promises more than it gives). Rates this high (engaged lists) let a 2 x 2 grid be
# decided in about a week of ~1,100 treated recipients a day by a stopping rule that stays
# honest under daily looks (always-valid intervals); at 3% it would take a month.
TRUE_CLICK_RATES: dict[str, float] = {
    "s1_cta1": 0.080,
    "s1_cta2": 0.072,
    "s2_cta1": 0.070,
    "s2_cta2": 0.120,
}
# Share of recipients who open, by subject line (s1, s2).
TRUE_OPEN_RATES: dict[str, float] = {"s1": 0.30, "s2": 0.36}
# Share of openers who unsubscribe, the same for every variant (far below the 2% guardrail).
TRUE_UNSUBSCRIBE_RATE = 0.004


def variant_name(subject_index: int, cta_index: int) -> str:
    """The name of the variant with the 0-based subject and call-to-action indexes: ``s1_cta2``."""
    return f"s{subject_index + 1}_cta{cta_index + 1}"


def variant_grid(
    subjects: Sequence[str],
    calls_to_action: Sequence[str],
    *,
    template: str,
    html_template: str | None = None,
) -> dict[str, dict[str, str]]:
    """Experiment variants: every subject line with every call to action.

    Args:
        subjects: Subject lines (Jinja2 templates over the plan row).
        calls_to_action: The sentences the tracking link follows (plain text).
        template: The plain-text body, with ``${call_to_action}`` where the variant's call to
            action goes.
        html_template: The HTML body, the same way; None leaves the channel's.

    Returns:
        Variant name (``s<i>_cta<j>``, 1-based, subjects first) -> the channel fields it
        overrides: ``subject``, ``template`` and, with ``html_template``, ``html_template``.

    Raises:
        ValueError: No subject or no call to action, a duplicate among either, or a body
            without ``${call_to_action}`` (the variants would not differ by it).
    """
    if not subjects or not calls_to_action:
        raise ValueError("variant_grid needs at least one subject and one call to action")
    for what, texts in (("subjects", subjects), ("calls_to_action", calls_to_action)):
        if len(set(texts)) != len(texts):
            raise ValueError(f"variant_grid: {what} holds duplicates")
    bodies = [("template", template)]
    if html_template is not None:
        bodies.append(("html_template", html_template))
    for field, body in bodies:
        if "${call_to_action}" not in body:
            raise ValueError(f"variant_grid: {field} has no ${{call_to_action}} placeholder")
    variants: dict[str, dict[str, str]] = {}
    for i, subject in enumerate(subjects):
        for j, cta in enumerate(calls_to_action):
            overrides = {"subject": subject}
            for field, body in bodies:
                overrides[field] = string.Template(body).substitute(call_to_action=cta)
            variants[variant_name(i, j)] = overrides
    return variants


def playbook_variants() -> dict[str, dict[str, str]]:
    """The variants of the playbook's experiment: :data:`SUBJECTS` by :data:`CALLS_TO_ACTION`
    over :data:`BODY_TEMPLATE` and :data:`HTML_TEMPLATE` (the YAML holds the same, spelled out)."""
    return variant_grid(
        SUBJECTS, CALLS_TO_ACTION, template=BODY_TEMPLATE, html_template=HTML_TEMPLATE
    )


def true_best(rates: Mapping[str, float] = TRUE_CLICK_RATES) -> str:
    """The variant with the highest true click rate."""
    return max(rates, key=lambda name: rates[name])


def true_lift(
    variant: str, *, control: str = CONTROL, rates: Mapping[str, float] = TRUE_CLICK_RATES
) -> float:
    """The true relative lift of ``variant`` over ``control`` (0.5 is +50%)."""
    return rates[variant] / rates[control] - 1.0
