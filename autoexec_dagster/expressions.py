r"""Rule and step expressions: pandas query syntax, checked against a grammar that cannot run code.

Expressions are comparisons, boolean logic and arithmetic over columns and literals; backticks
quote column names pandas could not otherwise read (``\`diagnose.cause\` == 'disk_full'``). Calls,
attributes and subscripts are refused, so a playbook cannot run arbitrary code.
"""

import ast
import re

from autoexec_dagster.errors import PlaybookError

# \Z, not $: $ also matches before a trailing newline, which would let "name\n" through.
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}\Z")
_BACKTICK_RE = re.compile(r"`([^`]+)`")

# Expression nodes a rule may contain: comparisons, boolean logic and arithmetic over columns and
# literals. Calls, attributes and subscripts are refused so a playbook cannot run arbitrary code.
_ALLOWED_NODES: tuple[type[ast.AST], ...] = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.USub,
    ast.UAdd,
    ast.Invert,
    ast.BinOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.Mod,
    ast.Pow,
    ast.FloorDiv,
    ast.BitAnd,
    ast.BitOr,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.In,
    ast.NotIn,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.List,
    ast.Tuple,
)


class ParsedExpression:
    """A rule expression checked against the allowed grammar.

    Attributes:
        source: The expression as written (pandas query syntax).
        columns: Column names it reads.
        numeric_columns: Columns it compares with numbers or uses in arithmetic; they must hold
            numeric values.
    """

    def __init__(self, source: str, columns: frozenset[str], numeric_columns: frozenset[str]):
        self.source = source
        self.columns = columns
        self.numeric_columns = numeric_columns


def parse_expression(source: str, *, rule: str) -> ParsedExpression:
    """Parse and check a rule expression.

    Args:
        source: Expression in pandas query syntax, e.g. ``"churn_score >= 0.7 and plan == 'pro'"``.
        rule: Name of the rule, for error messages.

    Returns:
        The columns the expression reads.

    Raises:
        PlaybookError: The expression does not parse or uses constructs rules do not allow.
    """
    if not source.strip():
        raise PlaybookError(f"rule {rule!r}: the 'when' expression is empty")
    placeholders: dict[str, str] = {}

    def _swap(match: re.Match[str]) -> str:
        name = f"__col{len(placeholders)}__"
        placeholders[name] = match.group(1)
        return name

    python_source = _BACKTICK_RE.sub(_swap, source)
    try:
        tree = ast.parse(python_source, mode="eval")
    except SyntaxError as exc:
        raise PlaybookError(
            f"rule {rule!r}: the expression {source!r} does not parse: {exc.msg}"
        ) from None
    except (RecursionError, MemoryError):
        # CPython's parser reports deep nesting (thousands of 'not', '-' or '+') this way.
        raise PlaybookError(
            f"rule {rule!r}: the expression {source[:80]!r}... is too deeply nested"
        ) from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise PlaybookError(
                f"rule {rule!r}: the expression {source!r} uses {type(node).__name__}, which rules "
                "do not allow (only comparisons, and/or/not, arithmetic, columns and literals)"
            )
    names = [node.id for node in ast.walk(tree) if isinstance(node, ast.Name)]
    for name in names:
        # Only backtick placeholders start with "__", once each; a written one is a forgery.
        if name.startswith("__") and (name not in placeholders or names.count(name) > 1):
            raise PlaybookError(
                f"rule {rule!r}: the expression {source!r} uses the name {name!r}; names with a "
                "leading double underscore are not allowed (quote such a column in backticks)"
            )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Pow)
            and _constant_only(node.left)
            and _constant_only(node.right)
        ):
            # pandas evaluates literals as Python integers: 9 ** 9 ** 9 would never finish.
            raise PlaybookError(
                f"rule {rule!r}: the expression {source!r} raises a power of two numbers; "
                "write the number itself"
            )
    columns: set[str] = set()
    numeric: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            columns.add(placeholders.get(node.id, node.id))
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_number(o) for o in operands):
                numeric.update(
                    placeholders.get(o.id, o.id) for o in operands if isinstance(o, ast.Name)
                )
        elif isinstance(node, ast.BinOp):
            numeric.update(
                placeholders.get(o.id, o.id)
                for o in (node.left, node.right)
                if isinstance(o, ast.Name)
            )
    # True/False/None parse as constants in Python 3, so every Name is a column.
    return ParsedExpression(source, frozenset(columns), frozenset(numeric))


def _constant_only(node: ast.AST) -> bool:
    return not any(isinstance(child, ast.Name) for child in ast.walk(node))


def _is_number(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    )
