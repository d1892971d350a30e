"""A small, safe expression language to pick and order a sweep's rows (``panal results --filter/--sort``).

    lr>=0.01 and width == 64          val_acc > 0.9 or not (state == "done")          -loss,lr

Comparisons (``== != < <= > >=``) of a name with a literal (a number, a quoted string, true/false/null),
joined by ``and``/``or``/``not`` and parentheses. Names resolve as :func:`jobs.report.lookup` does
(``lr``, ``params.lr``, ``values.eval.acc``, ``state``). Nothing is evaluated as Python: the text is
tokenised and parsed here into a tree of comparisons. A row that lacks a name, or holds a value of
another type than the literal (a string against a number), does not match; a name that no row has
is an error naming the ones that exist, so a typo does not silently empty the table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.report import lookup
from security.errors import BadRequest

__all__ = ["Filter", "FilterError", "SortKey", "parse_filter", "parse_sort", "sort_rows"]

MAX_LENGTH = 2000
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<op><=|>=|==|!=|<|>|=)
  | (?P<paren>[()])
  | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
""", re.VERBOSE)
_WORDS = {"and", "or", "not", "true", "false", "null"}
_LITERALS = {"true": True, "false": False, "null": None}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: bool(a == b), "!=": lambda a, b: bool(a != b), "<": lambda a, b: bool(a < b),
    "<=": lambda a, b: bool(a <= b), ">": lambda a, b: bool(a > b), ">=": lambda a, b: bool(a >= b)}


class FilterError(BadRequest):
    """A filter or sort expression that does not parse, or names nothing the rows have."""

    code = "bad_filter"


@dataclass(frozen=True)
class _Token:
    kind: str     # op, paren, number, string, name, word, end
    text: str
    at: int       # 1-based column, for the error message


Row = Mapping[str, Any]
_Node = Callable[[Row], bool]


@dataclass(frozen=True)
class Filter:
    """A parsed filter: ``matches(row)``; ``names`` are the names it reads (checked against the rows)."""

    text: str
    names: tuple[str, ...]
    _test: _Node

    def matches(self, row: Row) -> bool:
        return self._test(row)

    def select(self, rows: Iterable[Row]) -> list[Row]:
        """The rows that match, after checking that every name the filter reads exists in some row."""
        rows = list(rows)
        check_names(self.names, rows, "--filter")
        return [row for row in rows if self.matches(row)]


def _tokens(text: str) -> list[_Token]:
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter: longer than {MAX_LENGTH} characters")
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FilterError(f"filter: unexpected {text[pos]!r} at column {pos + 1}: {_point(text, pos)}")
        kind = m.lastgroup or ""
        if kind != "space":
            word = m.group()
            out.append(_Token("word" if kind == "name" and word in _WORDS else kind, word, pos + 1))
        pos = m.end()
    out.append(_Token("end", "", len(text) + 1))
    return out


def _point(text: str, pos: int) -> str:
    return f"{text!r} (here: {text[:pos]!r} >>> {text[pos:]!r})" if text else "(empty)"


class _Parser:
    """Recursive descent: or_expr := and_expr ('or' and_expr)*; and_expr := unary ('and' unary)*;
    unary := 'not' unary | '(' or_expr ')' | comparison; comparison := name op literal | literal op name."""

    def __init__(self, text: str) -> None:
        self.text, self.tokens, self.i, self.names = text, _tokens(text), 0, list[str]()

    def fail(self, token: _Token, expected: str) -> FilterError:
        got = "the end of the filter" if token.kind == "end" else repr(token.text)
        return FilterError(f"filter: expected {expected} at column {token.at}, got {got}: "
                           f"{_point(self.text, token.at - 1)}")

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def parse(self) -> _Node:
        if self.peek().kind == "end":
            raise FilterError("filter: empty (expected e.g. lr>=0.01 and val_acc > 0.9)")
        node = self.or_expr()
        if self.peek().kind != "end":
            raise self.fail(self.peek(), "'and', 'or' or the end")
        return node

    def or_expr(self) -> _Node:
        parts = [self.and_expr()]
        while self.peek().text == "or":
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else (lambda row: any(p(row) for p in parts))

    def and_expr(self) -> _Node:
        parts = [self.unary()]
        while self.peek().text == "and":
            self.take()
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else (lambda row: all(p(row) for p in parts))

    def unary(self) -> _Node:
        token = self.peek()
        if token.text == "not":
            self.take()
            inner = self.unary()
            return lambda row: not inner(row)
        if token.text == "(":
            self.take()
            inner = self.or_expr()
            if self.peek().text != ")":
                raise self.fail(self.peek(), "')'")
            self.take()
            return inner
        return self.comparison()

    def comparison(self) -> _Node:
        left = self.take()
        if left.kind not in ("name", "number", "string", "word") or left.text in ("and", "or", "not"):
            raise self.fail(left, "a name (e.g. lr), 'not' or '('")
        op = self.take()
        if op.kind != "op":
            raise self.fail(op, "a comparison (== != < <= > >=)")
        if op.text == "=":
            raise FilterError(f"filter: at column {op.at}: '=' compares nothing; write '==' (lr == 0.01)")
        right = self.take()
        if left.kind == "name" and right.kind != "name":
            name, literal, compare = left.text, self.literal(right), _COMPARE[op.text]
        elif right.kind == "name" and left.kind != "name":   # 0.01 <= lr: the same test, turned around
            name, literal, compare = right.text, self.literal(left), _COMPARE[_FLIP[op.text]]
        elif left.kind == "name":
            raise FilterError(f"filter: at column {right.at}: compare a name with a value, not with another "
                              f"name ({right.text!r}); quote a string: {left.text} {op.text} \"{right.text}\"")
        else:
            raise self.fail(right, "a name (one side of a comparison names a param or value)")
        self.names.append(name)
        return _comparison(name, literal, compare)

    def literal(self, token: _Token) -> Any:
        if token.kind == "number":
            return float(token.text)
        if token.kind == "string":
            return re.sub(r"\\(.)", r"\1", token.text[1:-1])
        if token.kind == "word" and token.text in _LITERALS:
            return _LITERALS[token.text]
        raise self.fail(token, "a value (a number, a \"quoted string\", true, false or null)")


_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _comparison(name: str, literal: Any, compare: Callable[[Any, Any], bool]) -> _Node:
    def test(row: Row) -> bool:
        found, value = lookup(row, name)
        if not found:
            return False
        if literal is None or isinstance(literal, bool):
            return compare(value, literal) if compare in (_COMPARE["=="], _COMPARE["!="]) else False
        if isinstance(literal, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                return compare is _COMPARE["!="]
            return compare(float(value), literal)
        if not isinstance(value, str):
            return compare is _COMPARE["!="]
        return compare(value, literal)
    return test


def parse_filter(text: str) -> Filter:
    """Parse ``text`` (raises :class:`FilterError` with the column and what was expected)."""
    parser = _Parser(text)
    test = parser.parse()
    return Filter(text, tuple(dict.fromkeys(parser.names)), test)


@dataclass(frozen=True)
class SortKey:
    name: str
    descending: bool


def parse_sort(text: str) -> list[SortKey]:
    """``-val_acc`` (best first for a larger-is-better value), ``loss``, ``-val_acc,lr`` (ties by lr)."""
    keys = []
    for part in text.split(","):
        part = part.strip()
        descending = part.startswith("-")
        name = part[1:].strip() if part.startswith(("-", "+")) else part
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", name):
            raise FilterError(f"sort: expected a name such as -val_acc or loss (comma-separated), got {part!r}")
        keys.append(SortKey(name, descending))
    return keys


def sort_rows(rows: Sequence[Row], keys: Sequence[SortKey]) -> list[Row]:
    """Rows ordered by ``keys``; a row without a key's value (a failed task) goes after those with one,
    whatever the direction, so the best rows are always on top (text and numbers are kept apart)."""
    check_names([k.name for k in keys], rows, "--sort")
    out = list(rows)
    for key in reversed(keys):   # stable sorts, least significant key first
        keyed = [(_sortable(lookup(r, key.name)), r) for r in out]
        present = [(k, r) for k, r in keyed if k is not None]
        present.sort(key=lambda kr: kr[0] or (0, 0.0, ""), reverse=key.descending)
        out = [r for _, r in present] + [r for k, r in keyed if k is None]
    return out


def _sortable(found_value: tuple[bool, Any]) -> tuple[int, float, str] | None:
    found, value = found_value
    if not found or value is None:
        return None
    if isinstance(value, bool):
        return (1, float(value), "")
    if isinstance(value, int | float):
        return None if math.isnan(value) else (1, float(value), "")
    if isinstance(value, str):
        return (0, 0.0, value)
    return None


def check_names(names: Iterable[str], rows: Sequence[Row], option: str) -> None:
    """Every name must be found in at least one row (when there are rows): else a clear error."""
    if not rows:
        return
    for name in names:
        if not any(lookup(row, name)[0] for row in rows):
            known = sorted({key for row in rows for key in _names_of(row)})
            raise FilterError(f"{option}: no task has {name!r}; names here: {', '.join(known[:40])}")


def _names_of(row: Row) -> list[str]:
    out = [k for k, v in row.items() if not isinstance(v, Mapping)]
    for section in ("params", "values", "metrics"):
        value = row.get(section)
        if isinstance(value, Mapping):
            out += [k for k, v in value.items() if not isinstance(v, Mapping | list)]
    return out
