"""``panal results JOB``: a job's signed results, verified offline, and read as a sweep.

Without a view option it lists every result (as before). ``--table`` shows one row per task with its
params and values, ``--csv`` writes the same rows as CSV, ``--json`` everything (``rows`` are the
sweep's rows); ``--sort -val_acc``, ``--filter 'lr>=0.01'`` (jobs/rowfilter.py) and ``--limit N`` pick
and order the rows of any of them (and imply ``--table`` alone). A manifest with ``spec.report`` sorts
best first by default. Where each column comes from, and why it needs no trust in the board:
agent/client/sweep.py.

The command reads in three steps so that options can be added without touching the others:
:func:`fetch` (the board's replies and output files), :func:`read` (checks and rows),
:func:`show` (the chosen view).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from agent.cli.common import EXIT_FAILED, console, home, plain, print_json, run, with_client
from agent.cli.jobs import hub_option, insecure_option
from agent.client.board import BoardClient
from agent.client.merge import merge_outputs
from agent.client.submitting import ResultCheck, fetch_outputs, output_file_name, task_dir_name, verify_results
from agent.client.sweep import Sweep, check_params, sweep_of, sweep_rows
from agent.client.validation import check_validation, unit_rows
from jobs.checkpoints import resumed_from
from jobs.report import SECTIONS, lookup
from jobs.rowfilter import Filter, SortKey, parse_filter, parse_sort, sort_rows

__all__ = ["results_cmd"]

MAX_VALUE_COLUMNS = 8
CELL_CHARS = 24


@dataclass
class Fetched:
    """What the board answered (and problems found in downloaded outputs)."""

    reply: dict[str, Any]
    tasks: list[dict[str, Any]]
    checks: list[ResultCheck]
    output_problems: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Selection:
    """Which sweep rows to show, in what order."""

    where: Filter | None = None
    order: list[SortKey] | None = None
    limit: int | None = None

    @property
    def given(self) -> bool:
        return self.where is not None or self.order is not None or self.limit is not None


async def fetch(client: BoardClient, job_id: str, out_dir: Path | None) -> Fetched:
    reply = dict(await client.call("GET", f"/v1/jobs/{job_id}/results"))
    tasks = list((await client.call("GET", f"/v1/jobs/{job_id}/tasks"))["tasks"])
    checks = verify_results(reply)
    problems = await fetch_outputs(client, checks, out_dir) if out_dir is not None else {}
    return Fetched(reply, tasks, checks, problems)


def read(fetched: Fetched, selection: Selection) -> tuple[dict[str, Any], list[ResultCheck], list[str], Sweep]:
    """The index (job, results, tasks' validation, sweep rows), the checks and validation problems."""
    reply, sweep = fetched.reply, sweep_of(fetched.reply)
    checks = [c if not fetched.output_problems.get(c.task_id) else
              ResultCheck(c.task_id, c.agent, False,
                          "; ".join(filter(None, [c.problem, *fetched.output_problems[c.task_id]])), c.payload)
              for c in fetched.checks]
    checks = check_params(checks, reply, sweep)
    results: list[dict[str, Any]] = [
        {"task_id": c.task_id, "unit": r.get("unit"), "agent": c.agent, "verified": c.ok,
         "problem": c.problem or None, "state": r.get("state"),
         "params": _params(sweep, r.get("unit"), c.payload),
         "values": c.payload.get("values"), "metrics": c.payload.get("metrics"), "notes": c.payload.get("notes"),
         "environment": c.payload.get("environment"), "resumed_from": resumed_from(c.payload),
         "outputs": {name: {**o, "path": f"{task_dir_name(c.task_id)}/{output_file_name(name, o)}"}
                     for name, o in (c.payload.get("outputs") or {}).items()}}
        for c, r in zip(checks, reply["results"], strict=True)]
    rows = select(sweep_rows(reply, checks, fetched.tasks, sweep), selection, sweep)
    index = {"job": reply["job"], "results": results, "tasks": unit_rows(reply, checks), "rows": rows}
    return index, checks, check_validation(reply, checks), sweep


def _params(sweep: Sweep, unit: Any, payload: dict[str, Any]) -> dict[str, Any]:
    params = sweep.params(int(unit)) if unit is not None else None
    return params if params is not None else dict(payload.get("params") or {})


def select(rows: list[dict[str, Any]], selection: Selection, sweep: Sweep) -> list[dict[str, Any]]:
    """Filter, then sort (by ``--sort``, else best first by the manifest's ``spec.report``), then limit."""
    picked: list[dict[str, Any]] = [dict(r) for r in selection.where.select(rows)] if selection.where else rows
    order = selection.order
    if order is None and sweep.report is not None and any(lookup(r, sweep.report.metric)[0] for r in picked):
        order = [SortKey(sweep.report.metric, sweep.report.mode == "max")]
    if order:
        picked = [dict(r) for r in sort_rows(picked, order)]
    return picked[:selection.limit] if selection.limit is not None else picked


@click.command("results")
@click.argument("job_id")
@hub_option
@insecure_option
@click.option("--verify", is_flag=True, help="Check every result's signature and digest; exit 2 on a bad one.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Write results.json (and outputs) into this directory.")
@click.option("--merge", is_flag=True, help="With -o: join a row-sharded job's outputs into one file per output "
                                            "(rows in input order); refused unless every shard is validated.")
@click.option("--json", "as_json", is_flag=True, help="Everything as JSON (the sweep's rows under `rows`).")
@click.option("--table", "as_table", is_flag=True, help="One row per task: its params, state and values.")
@click.option("--csv", "as_csv", is_flag=True, help="The table's rows as CSV (every param, value and metric).")
@click.option("--sort", "sort_text", default=None, metavar="KEYS",
              help="Order rows: -val_acc (largest first), loss (smallest first), -val_acc,lr (ties by lr).")
@click.option("--filter", "filter_text", default=None, metavar="EXPR",
              help="Keep rows that match, e.g. 'lr>=0.01 and state==\"done\"' (== != < <= > >=, and/or/not).")
@click.option("--limit", type=click.IntRange(min=0), default=None, help="At most N rows (after sort and filter).")
def results_cmd(job_id: str, hub_url: str | None, insecure: bool, verify: bool, out_dir: Path | None,
                merge: bool, as_json: bool, as_table: bool, as_csv: bool, sort_text: str | None,
                filter_text: str | None, limit: int | None) -> None:
    """Show a job's results (params, values and metrics per task), optionally verifying the signature chain."""
    # expressions are checked before anything is fetched: a typo costs no round trip
    selection = Selection(parse_filter(filter_text) if filter_text is not None else None,
                          parse_sort(sort_text) if sort_text is not None else None, limit)
    if as_json + as_table + as_csv > 1:
        raise click.UsageError("choose one of --json, --table and --csv")
    if merge and out_dir is None:
        raise click.UsageError("--merge writes the merged files into the -o DIR folder: give -o DIR")
    fetched = run(with_client(home().default_board(hub_url), lambda c: fetch(c, job_id, out_dir), insecure))
    index, checks, validation_problems, sweep = read(fetched, selection)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(index, indent=2, default=str))
    if merge and out_dir is not None:   # refused unless every shard is in, verified and validated
        merged = merge_outputs(fetched.reply, checks, index["tasks"], out_dir, validation_problems)
        index["merged"] = {name: str(path) for name, path in merged.items()}
        if not as_json:
            click.echo("merged: " + ", ".join(index["merged"].values()), err=True)
    if as_json:
        print_json(index)
    elif as_csv:
        write_csv(index["rows"])
    elif as_table or selection.given:
        console.print(sweep_table(index["rows"], sweep, selection))
        click.echo(f"{len(index['rows'])} of {index['job']['n_tasks']} task(s); {index['job']['id']} "
                   f"{index['job']['state']}", err=True)
    else:
        show_list(index)
    if verify:
        report_verification(checks, index["tasks"], validation_problems)


def show_list(index: dict[str, Any]) -> None:
    """The plain listing: validation per task, then every result."""
    rows = index["results"]
    click.echo(f"{index['job']['id']} {index['job']['state']}: {len(rows)} result(s)")
    for unit in index["tasks"]:
        click.echo(f"  {unit_line(unit)}")
    for row in rows:
        mark = "verified" if row["verified"] else f"NOT VERIFIED ({row['problem']})"
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in (row["metrics"] or {}).items()
                            if isinstance(v, int | float))
        click.echo(f"  {row['task_id']}  {mark}  agent {row['agent'][:16]}  {metrics}")
        if row["params"]:
            click.echo(f"      params {json.dumps(row['params'], default=str)[:200]}")
        if row["values"]:
            click.echo(f"      {json.dumps(row['values'], default=str)[:200]}")
        if row["resumed_from"]:
            click.echo(f"      resumed from a checkpoint signed by agent {row['resumed_from'][:16]}")


def report_verification(checks: list[ResultCheck], units: list[dict[str, Any]], problems: list[str]) -> None:
    bad = [c for c in checks if not c.ok]
    for check in bad:
        click.echo(f"{check.task_id}: {check.problem}", err=True)
    for problem in problems:
        click.echo(f"validation record: {problem}", err=True)
    if bad or problems:
        click.echo(f"{len(bad)} result(s) and {len(problems)} validation record(s) failed verification", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"all {len(checks)} result signature(s) verified; manifest signature verified; "
               f"{sum(1 for u in units if u['state'] == 'validated')} validation record(s) agree with "
               "the signed results", err=True)


def unit_line(unit: dict[str, Any]) -> str:
    """One task's validation, for people."""
    if unit["state"] == "validated":
        text = f"{unit['task_id']}  validated by {len(unit['agents'])} agent(s) (quorum {unit['quorum']})"
        if unit["invalid"]:
            text += f"; {len(unit['invalid'])} invalid: " + ", ".join(
                f"{i['agent_id'][:12]} said {json.dumps(i['values'], default=str)[:80]}" for i in unit["invalid"])
        return text
    if unit["state"] == "no_consensus":
        return f"{unit['task_id']}  no_consensus: " + "; ".join(
            f"{a['agent_id'][:12]} said {json.dumps(a['values'], default=str)[:80]}" for a in unit.get("answers", []))
    return f"{unit['task_id']}  pending (quorum {unit['quorum']})"


# -- the table and CSV views --------------------------------------------------------------------------------
def columns(rows: list[dict[str, Any]], sweep: Sweep, selection: Selection | None,
            everything: bool) -> list[tuple[str, str]]:
    """(header, name to look up) of the columns to show: the swept (or varying) params, the scalar values,
    and whatever --sort/--filter/spec.report name; ``everything``: every scalar param, value and metric
    (CSV). A header is the bare key unless two sections share it (then ``values.lr``)."""
    seen: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for row in rows:
        for section in SECTIONS:
            for key, value in (row.get(section) or {}).items():
                if _scalar(value) and key not in seen[section]:
                    seen[section].append(key)
    shown = {s: list(keys) for s, keys in seen.items()}
    if not everything:
        varying = [k for k in seen["params"] if len({json.dumps(r["params"].get(k), default=str)
                                                      for r in rows if r.get("params")}) > 1]
        shown["params"] = [k for k in seen["params"] if k in sweep.swept or k in varying]
        shown["values"] = seen["values"][:MAX_VALUE_COLUMNS]
        shown["metrics"] = []
    out: list[tuple[str, str]] = []
    for section in ("params", "values", "metrics"):
        for key in shown[section]:
            clash = any(key in seen[s] for s in SECTIONS if s != section)
            out.append((f"{section}.{key}" if clash else key, f"{section}.{key}"))
    wanted = [k.name for k in selection.order or []] if selection else []
    wanted += list(selection.where.names) if selection and selection.where else []
    wanted += [sweep.report.metric] if sweep.report else []
    have = {h for h, _ in out} | {n for _, n in out}
    for name in dict.fromkeys(wanted):
        if name not in have and name not in _FIXED and not any(n.endswith("." + name) for n in have):
            out.append((name, name))
    return out


_FIXED = ("task_id", "unit", "state", "error_class", "error", "agent", "verified")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}"
    text = str(value) if _scalar(value) else json.dumps(value, default=str)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…"


def sweep_table(rows: list[dict[str, Any]], sweep: Sweep, selection: Selection) -> Table:
    cols = columns(rows, sweep, selection, everything=False)
    failed = any(r.get("error_class") for r in rows)
    table = Table(box=None)
    for header in ("TASK", "STATE", *(h for h, _ in cols), *(["ERROR"] if failed else [])):
        table.add_column(plain(header), justify="right" if header not in ("STATE", "ERROR") else "left")
    for row in rows:
        cells = [str(row["unit"]), row["state"], *(_cell(lookup(row, n)[1]) for _, n in cols)]
        if failed:
            cells.append(row.get("error_class") or "")
        table.add_row(*map(plain, cells))
    return table


def write_csv(rows: list[dict[str, Any]]) -> None:
    """Every scalar param, value and metric, one column each; a failed task's error class and message."""
    cols = columns(rows, Sweep(None, [], None), None, everything=True)
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["task_id", "unit", "state", "error_class", *(h for h, _ in cols), "agent", "verified", "error"])
    for row in rows:
        values = [lookup(row, n)[1] for _, n in cols]
        out.writerow([row["task_id"], row["unit"], row["state"], row.get("error_class") or "",
                      *("" if v is None else v for v in values), row.get("agent") or "",
                      "" if row.get("verified") is None else row["verified"], row.get("error") or ""])
