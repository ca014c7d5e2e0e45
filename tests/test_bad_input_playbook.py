"""Malformed, hostile and fuzzed YAML playbooks: each is refused with a PlaybookError that names
the problem, never another exception, never a hang, and never constructs a Python object.

The hypothesis suites mutate a valid playbook (text and structure); ``make reliability`` runs
them with many more examples.
"""

import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoexec_dagster import Playbook, PlaybookError
from tests.bad_input_support import Corpus, corpus_fixture
from tests.reliability import record, trials

VALID = """\
name: churn_outreach
entity_key: customer_id
rules:
  - name: vip_at_risk
    when: churn_score >= 0.7 and lifetime_value >= 5000
    escalate: "High-value customer at risk"
  - name: at_risk
    when: churn_score >= 0.7
    action: retention_email
  - name: watch
    when: "`churn score` >= 0.5 or segment in ['a', 'b']"
    action: crm_task
guardrails:
  max_actions: 50000
  max_flagged_fraction: 0.5
  holdout_fraction: 0.05
  cooldown_days: 7
score_ranges:
  churn_score: [0, 1]
"""


def rule_yaml(when: str, **extra: str) -> str:
    body = {"name": "rule_a", "when": when, "action": "notify", **extra}
    return yaml.safe_dump({"name": "book", "entity_key": "id", "rules": [body]})


def _bomb(levels: int, where: str) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        previous = chr(ord("a") + level - 1)
        name = chr(ord("a") + level)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    last = chr(ord("a") + levels - 1)
    return "\n".join(lines) + f"\n{where}: *{last}\n"


# The whole file is the case; {marker} is a file path that a constructed object would create.
CASES: list[tuple[str, str, str]] = [
    # Not YAML, or not a mapping.
    ("unclosed flow", "name: [unclosed\n", "not valid YAML"),
    ("bad indentation", "name: a\n  entity_key: b\n rules: []\n", "not valid YAML"),
    ("tab indentation", "name: a\nrules:\n\t- name: r\n", "not valid YAML"),
    ("empty file", "", "expected a mapping at the top level, got NoneType"),
    ("top-level list", "- name: a\n", "expected a mapping at the top level, got list"),
    ("top-level scalar", "just some text\n", "expected a mapping at the top level, got str"),
    ("top-level number", "42\n", "expected a mapping at the top level, got int"),
    ("deeply nested flow", "name: " + "[" * 20_000 + "]" * 20_000 + "\n", "not valid YAML"),
    ("integer past the digit limit", VALID + "description: " + "9" * 5000 + "\n", "YAML"),
    # Tags that would construct Python objects in an unsafe loader.
    (
        "python/object/apply",
        'name: !!python/object/apply:os.system ["touch {marker}"]\n',
        "not valid YAML",
    ),
    (
        "python/object/new",
        "name: !!python/object/new:pathlib.Path ['{marker}']\n",
        "not valid YAML",
    ),
    ("python/name", "name: !!python/name:os.system\n", "not valid YAML"),
    ("python/module", "name: !!python/module:os\n", "not valid YAML"),
    (
        "python/object",
        "guardrails: !!python/object:autoexec_dagster.playbook.Guardrails {{}}\n",
        "not valid YAML",
    ),
    (
        "binary name",
        VALID.replace("name: churn_outreach", "name: !!binary QmFkIE5hbWU="),
        "playbook name 'Bad Name'",
    ),
    # Unknown keys and wrong types.
    ("unknown top-level key", VALID + "nmae: typo\n", "nmae: Extra inputs are not permitted"),
    (
        "unknown rule key",
        rule_yaml("x > 1", acton="notify"),
        "rules.0.acton: Extra inputs are not permitted",
    ),
    (
        "unknown guardrail key",
        VALID.replace("guardrails:\n", "guardrails:\n  max_action: 5\n"),
        "guardrails.max_action: Extra inputs are not permitted",
    ),
    ("rules not a list", "name: a\nentity_key: id\nrules: everything\n", "rules: Input should"),
    ("no rules", "name: a\nentity_key: id\nrules: []\n", "at least 1 item"),
    ("rules missing", "name: a\nentity_key: id\n", "rules: Field required"),
    ("rule not a mapping", "name: a\nentity_key: id\nrules: [just_text]\n", "rules.0"),
    ("when a list", rule_yaml("x").replace("when: x", "when: [x]"), "when"),
    ("when missing", "name: a\nentity_key: id\nrules: [{name: r, action: n}]\n", "when"),
    ("max_actions text", VALID.replace("50000", "ten"), "max_actions: Input should be"),
    ("max_actions negative", VALID.replace("50000", "-1"), "max_actions: Input should be"),
    (
        "fraction above one",
        VALID.replace("max_flagged_fraction: 0.5", "max_flagged_fraction: 2"),
        "max_flagged_fraction",
    ),
    ("holdout negative", VALID.replace("0.05", "-0.1"), "holdout_fraction"),
    ("holdout nan", VALID.replace("0.05", ".nan"), "holdout_fraction"),
    (
        "cooldown infinite",
        VALID.replace("cooldown_days: 7", "cooldown_days: .inf"),
        "cooldown_days",
    ),
    (
        "cooldown huge",
        VALID.replace("cooldown_days: 7", "cooldown_days: 1.0e+300"),
        "cooldown_days",
    ),
    ("score range reversed", VALID.replace("[0, 1]", "[1, 0]"), "above high"),
    ("score range nan", VALID.replace("[0, 1]", "[.nan, 1]"), "score_ranges"),
    ("score range of three", VALID.replace("[0, 1]", "[0, 1, 2]"), "score_ranges"),
    ("version a list", VALID + "version: [1]\n", "version: Input should be a valid string"),
    # Names.
    (
        "playbook name with spaces",
        VALID.replace("churn_outreach", "Churn Outreach"),
        "playbook name",
    ),
    (
        "playbook name newline",
        VALID.replace("name: churn_outreach", 'name: "churn\\n"'),
        "playbook name",
    ),
    ("rule name digit", VALID.replace("vip_at_risk", "1vip"), "rule name"),
    ("rule name newline", VALID.replace("name: vip_at_risk", 'name: "vip\\n"'), "rule name"),
    (
        "action name newline",
        VALID.replace("action: crm_task", 'action: "crm_task\\n"'),
        "action name",
    ),
    ("action name with dots", VALID.replace("action: crm_task", "action: crm.task"), "action name"),
    (
        "entity_key blank",
        VALID.replace("entity_key: customer_id", 'entity_key: "  "'),
        "entity_key",
    ),
    ("duplicate rule names", VALID.replace("name: watch", "name: at_risk"), "used twice"),
    # Outcomes.
    (
        "action and skip",
        VALID.replace("action: retention_email", "action: retention_email\n    skip: true"),
        "exactly one",
    ),
    ("no outcome", "name: a\nentity_key: id\nrules: [{name: r, when: x > 1}]\n", "exactly one"),
    (
        "blank escalation",
        VALID.replace('"High-value customer at risk"', '"  "'),
        "escalation reason is empty",
    ),
    # Expressions that are not comparisons over columns.
    ("empty when", rule_yaml(" "), "expression is empty"),
    ("call", rule_yaml("__import__('os').system('id') == 0"), "uses Call"),
    ("method call", rule_yaml("churn_score.max() > 1"), "uses Call"),
    ("attribute", rule_yaml("churn_score.__class__ == 1"), "uses Attribute"),
    ("subscript", rule_yaml("churn_score[0] > 1"), "uses Subscript"),
    ("lambda", rule_yaml("(lambda: 1)() > 0"), "uses"),
    ("comprehension", rule_yaml("[c for c in churn_score] == 1"), "uses ListComp"),
    ("walrus", rule_yaml("(x := 1) > 0"), "uses NamedExpr"),
    ("f-string", rule_yaml("f'{churn_score}' == '1'"), "uses JoinedStr"),
    ("conditional", rule_yaml("1 if churn_score else 0"), "uses IfExp"),
    ("pandas local variable", rule_yaml("@os > 1"), "does not parse"),
    ("statement", rule_yaml("churn_score > 1; import os"), "does not parse"),
    ("null byte", rule_yaml("churn_score\x00 > 1"), "does not parse"),
    ("dunder name", rule_yaml("__import__ > 1"), "double underscore"),
    ("dunder builtins", rule_yaml("__builtins__ == 1"), "double underscore"),
    ("placeholder forgery", rule_yaml("`a b` > 1 and __col0__ > 1"), "double underscore"),
    ("constant power tower", rule_yaml("churn_score > 9 ** 9 ** 9"), "power of two numbers"),
    ("constant power", rule_yaml("churn_score > (-9) ** 99999999999"), "power of two numbers"),
    ("deep not", rule_yaml("not " * 50_000 + "x"), "too deeply nested"),
    ("deep minus", rule_yaml("-" * 50_000 + "x > 1"), "too deeply nested"),
    ("long sum", rule_yaml(" + ".join(["x"] * 50_000) + " > 1"), "too deeply nested"),
    ("deep parentheses", rule_yaml("(" * 500 + "x" + ")" * 500 + " > 1"), "does not parse"),
    # Alias bombs ("billion laughs"): nine levels would be 387 million strings if expanded.
    ("alias bomb in description", _bomb(9, "description"), "description: Input should be"),
    ("alias bomb in rules", _bomb(9, "rules"), "rules.0"),
    ("alias bomb in personal columns", _bomb(9, "personal_columns"), "personal_columns"),
    ("alias bomb as a rule's when", VALID + _bomb(9, "x").replace("\nx: *i", ""), "Extra inputs"),
]


@pytest.fixture(scope="module")
def corpus() -> Iterator[Corpus]:
    with corpus_fixture("playbook_yaml") as c:
        yield c


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("text", "problem"), [(t, p) for _, t, p in CASES], ids=[c[0] for c in CASES]
)
def test_bad_playbook_is_refused_with_a_playbook_error(
    text: str, problem: str, tmp_path: Path, corpus: Corpus
) -> None:
    marker = tmp_path / "constructed"
    path = tmp_path / "playbook.yaml"
    path.write_text(text.replace("{marker}", str(marker)).replace("{{}}", "{}"), encoding="utf-8")
    with corpus.case():
        with pytest.raises(PlaybookError, match=problem):
            Playbook.from_yaml(path)
        assert not marker.exists()  # no tag constructed an object that acted


def test_the_valid_playbook_of_the_corpus_loads(tmp_path: Path) -> None:
    path = tmp_path / "playbook.yaml"
    path.write_text(VALID, encoding="utf-8")
    book = Playbook.from_yaml(path)
    assert [r.name for r in book.rules] == ["vip_at_risk", "at_risk", "watch"]


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path, corpus: Corpus) -> None:
    path = tmp_path / "playbook.yaml"
    path.write_bytes(b"name: \xff\xfe churn\n")
    with corpus.case(), pytest.raises(PlaybookError, match="UTF-8"):
        Playbook.from_yaml(path)


def test_a_missing_file_is_refused(tmp_path: Path, corpus: Corpus) -> None:
    with corpus.case(), pytest.raises(PlaybookError, match="cannot read playbook"):
        Playbook.from_yaml(tmp_path / "absent.yaml")


# -- fuzzing ---------------------------------------------------------------------------------

_YAML_CHARS = string.ascii_letters + string.digits + " \t\n:-[]{}&*!|>'\"#%@`,.?_()=<~\\"
_FUZZ_EXAMPLES = trials(150, 3000)
_fuzz_counts = {"examples": 0, "valid": 0, "refused": 0}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzz")
    record("bad_input", group="playbook_fuzz", cases=_fuzz_counts["examples"], **_fuzz_counts)


def _load(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _fuzz_counts["examples"] += 1
    try:
        Playbook.from_yaml(path)
    except PlaybookError as exc:
        assert str(exc)  # a message, not an empty error
        _fuzz_counts["refused"] += 1
    else:
        _fuzz_counts["valid"] += 1


_edit = st.tuples(
    st.sampled_from(["insert", "delete", "replace"]),
    st.integers(min_value=0, max_value=len(VALID)),
    st.text(alphabet=_YAML_CHARS, min_size=1, max_size=8),
)


@pytest.mark.timeout(120)
@settings(
    max_examples=_FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(edits=st.lists(_edit, min_size=1, max_size=6))
def test_mutated_yaml_text_gives_a_playbook_or_a_playbook_error(
    edits: list[tuple[str, int, str]], fuzz_dir: Path
) -> None:
    text = VALID
    for kind, position, chunk in edits:
        at = min(position, len(text))
        if kind == "insert":
            text = text[:at] + chunk + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + len(chunk) :]
        else:
            text = text[:at] + chunk + text[at + len(chunk) :]
    _load(fuzz_dir / "mutated.yaml", text)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["x > 1", "__class__", "a.b()", "not", "churn_score >= 0.7", "`a b` == 1"]),
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = [
    "name",
    "entity_key",
    "rules",
    "guardrails",
    "description",
    "version",
    "holdout_salt",
    "required_columns",
    "score_ranges",
    "personal_columns",
]


@pytest.mark.timeout(120)
@settings(
    max_examples=_FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    field=st.sampled_from(
        [*_FIELDS, "rules.0.when", "rules.0.name", "rules.1.action", "guardrails.max_actions"]
    ),
    value=_values,
)
def test_a_field_replaced_by_any_value_gives_a_playbook_or_a_playbook_error(
    field: str, value: Any, fuzz_dir: Path
) -> None:
    data = yaml.safe_load(VALID)
    target = data
    *parents, last = field.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[int(last) if last.isdigit() else last] = value
    _load(fuzz_dir / "structured.yaml", yaml.safe_dump(data, allow_unicode=True))
