"""The sweep filter and sort language (jobs/rowfilter.py) and name lookup (jobs/report.py): what matches,
what sorts first, and that every bad expression is one clear error naming where and what was expected."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.report import ReportSpec, better, lookup, metric_value
from jobs.rowfilter import FilterError, parse_filter, parse_sort, sort_rows

ROWS: list[dict[str, Any]] = [
    {"unit": 0, "state": "done", "error_class": None, "params": {"lr": 0.1, "width": 32, "opt": "sgd"},
     "values": {"val_acc": 0.81, "loss": 0.5, "eval": {"top5": 0.97}}, "metrics": {"wall_s": 3.0}},
    {"unit": 1, "state": "done", "error_class": None, "params": {"lr": 0.01, "width": 64, "opt": "adam"},
     "values": {"val_acc": 0.93, "loss": 0.2, "eval": {"top5": 0.99}}, "metrics": {"wall_s": 4.0}},
    {"unit": 2, "state": "failed", "error_class": "oom", "params": {"lr": 0.001, "width": 128, "opt": "adam"},
     "values": {}, "metrics": {}},
    {"unit": 3, "state": "done", "error_class": None, "params": {"lr": 0.001, "width": 32, "opt": "adam"},
     "values": {"val_acc": 0.88, "loss": 0.3, "eval": {"top5": 0.98}}, "metrics": {"wall_s": 5.0}},
]


def units(rows: list[Any]) -> list[int]:
    return [r["unit"] for r in rows]


@pytest.mark.parametrize(("text", "expected"), [
    ("lr>=0.01", [0, 1]),
    ("lr >= 1e-2", [0, 1]),
    ("0.01 <= lr", [0, 1]),                                   # literal first: the same test turned around
    ("width == 32 and val_acc > 0.85", [3]),
    ("width == 32 or width == 128", [0, 2, 3]),
    ("not (state == \"done\")", [2]),
    ("state != 'done'", [2]),
    ("opt == \"adam\" and not lr < 0.005", [1]),
    ("(lr < 0.05 or width > 100) and state == \"done\"", [1, 3]),
    ("values.eval.top5 >= 0.98", [1, 3]),                     # dotted into nested values
    ("params.width > 40", [1, 2]),
    ("metrics.wall_s < 4.5", [0, 1]),
    ("val_acc > 0.5", [0, 1, 3]),                             # a failed task has no val_acc: no match
    ("error_class == \"oom\"", [2]),
    ("opt > 5", []),                                          # a string against a number: no match, no crash
    ("error_class == null", [0, 1, 3]),
])
def test_filter_keeps_the_rows_that_match(text: str, expected: list[int]) -> None:
    assert units(parse_filter(text).select(ROWS)) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "filter: empty"),
    ("lr >=", "expected a value (a number, a \"quoted string\", true, false or null) at column 6, got the end"),
    ("lr = 0.1", "'=' compares nothing; write '=='"),
    ("lr >= 0.01 and", "expected a name (e.g. lr), 'not' or '(' at column 15, got the end of the filter"),
    ("(lr > 0.1", "expected ')' at column 10"),
    ("lr > 0.1)", "expected 'and', 'or' or the end at column 9, got ')'"),
    ("opt == adam", "compare a name with a value, not with another name ('adam'); quote a string: opt == \"adam\""),
    ("lr ~ 3", "unexpected '~' at column 4"),
    ("__import__('os').system('x')", "unexpected '.' at column 17"),
    ("__import__('os')", "expected a comparison (== != < <= > >=) at column 11, got '('"),
    ("lr > 0.1 and 3 > 2", "expected a name (one side of a comparison names a param or value) at column 18"),
    ("lr >= 0.01; rm -rf /", "unexpected ';' at column 11"),
    ("lr" + " " * 2000, "longer than 2000 characters"),
])
def test_bad_filters_are_one_clear_error_with_the_column(text: str, message: str) -> None:
    with pytest.raises(FilterError) as err:
        parse_filter(text)
    assert message in err.value.message
    assert err.value.code == "bad_filter"


def test_a_name_no_row_has_is_an_error_listing_the_names_there() -> None:
    with pytest.raises(FilterError) as err:
        parse_filter("val_accuracy > 0.9").select(ROWS)
    assert "--filter: no task has 'val_accuracy'" in err.value.message
    assert "val_acc" in err.value.message and "lr" in err.value.message
    with pytest.raises(FilterError, match="--sort: no task has 'acc'"):
        sort_rows(ROWS, parse_sort("-acc"))


def test_sort_puts_the_best_first_either_way_and_tasks_without_a_value_last() -> None:
    assert units(sort_rows(ROWS, parse_sort("-val_acc"))) == [1, 3, 0, 2]
    assert units(sort_rows(ROWS, parse_sort("loss"))) == [1, 3, 0, 2]
    assert units(sort_rows(ROWS, parse_sort("width,-lr"))) == [0, 3, 1, 2]   # ties on width: larger lr first
    assert units(sort_rows(ROWS, parse_sort("+opt, unit"))) == [1, 2, 3, 0]


@pytest.mark.parametrize("text", ["", "-", "-val acc", "lr;drop", "--x"])
def test_bad_sort_keys_are_refused(text: str) -> None:
    with pytest.raises(FilterError, match="sort: expected a name such as -val_acc"):
        parse_sort(text)


def test_names_resolve_values_then_metrics_then_params_and_sections_can_be_named() -> None:
    row = {"state": "done", "params": {"seconds": 2, "lr": 0.1}, "values": {"lr": "echo"},
           "metrics": {"seconds": 1.5}}
    assert lookup(row, "lr") == (True, "echo")
    assert lookup(row, "params.lr") == (True, 0.1)
    assert lookup(row, "seconds") == (True, 1.5)
    assert lookup(row, "params.seconds") == (True, 2)
    assert lookup(row, "state") == (True, "done")
    assert lookup(row, "nope") == (False, None)


def test_report_metric_is_a_finite_number_from_values_or_metrics() -> None:
    assert metric_value({"values": {"val_acc": 0.9}}, "val_acc") == 0.9
    assert metric_value({"values": {}, "metrics": {"gflops": 12}}, "gflops") == 12.0
    assert metric_value({"values": {"eval": {"acc": 0.5}}}, "values.eval.acc") == 0.5
    for bad in (float("nan"), float("inf"), True, "0.9", None, [0.9]):
        assert metric_value({"values": {"val_acc": bad}}, "val_acc") is None
    assert metric_value({"values": "not a map"}, "val_acc") is None
    spec = ReportSpec.from_dict({"metric": "loss", "mode": "min"})
    assert spec is not None and spec.to_dict() == {"metric": "loss", "mode": "min"}
    assert better(0.1, 0.2, "min") and not better(0.2, 0.2, "max") and better(-5.0, None, "max")
