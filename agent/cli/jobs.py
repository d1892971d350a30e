"""``panal submit / jobs / job / cancel``: the submitter's commands (``results`` is agent/cli/results.py)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from agent.cli.common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_TIMEOUT,
    console,
    home,
    plain,
    print_json,
    run,
    with_client,
)
from agent.client.board import BoardClient
from agent.client.submitting import (
    make_envelope,
    prepare_inputs,
    submit,
    upload_inputs,
    wait_job,
)
from jobs.code_spec import bundle_manifest
from jobs.manifest import ManifestError
from jobs.manifest_files import load_manifests
from jobs.precheck import check_local_inputs

hub_option = click.option("--hub", "hub_url", default=None, metavar="URL",
                          help="Board join URL (default: PANAL_HUB, `panal config set hub`, `panal up`).")
insecure_option = click.option("--insecure", is_flag=True, help="Allow plain HTTP to a non-loopback board.")


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None)
    for col in ("ID", "NAME", "KIND", "STATE", "TASKS", "PRIORITY"):
        table.add_column(col)
    for job in jobs:
        done = job.get("tasks", {}).get("done", 0)
        table.add_row(*map(plain, (job["id"], job["name"], job["kind"], job["state"], f"{done}/{job['n_tasks']}",
                                   job["priority"])))
    return table


def _progress_line(job: dict[str, Any]) -> str:
    counts = job.get("tasks", {})
    parts = [f"{state} {counts[state]}" for state in ("queued", "leased", "done", "failed", "cancelled")
             if counts.get(state)]
    return f"{job['id']} {job['state']}: " + ", ".join(parts)


@click.command("submit")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@hub_option
@insecure_option
@click.option("--wait", "--follow", "wait", is_flag=True,
              help="Follow the jobs' progress until they finish; exit 0 only if all succeeded.")
@click.option("--timeout", "timeout_s", type=float, default=24 * 3600.0, show_default=True,
              help="With --wait: give up waiting after this many seconds (exit 4).")
@click.option("--json", "as_json", is_flag=True)
def submit_cmd(files: tuple[Path, ...], hub_url: str | None, insecure: bool, wait: bool, timeout_s: float,
               as_json: bool) -> None:
    """Validate, sign and submit manifests (several documents in a file make several jobs)."""
    pairs = [(path, m) for path in files for m in load_manifests(path)]   # code checked here: before uploads
    refused: list[tuple[tuple[str, int, int] | None, str, str]] = [
        (None, f"{path}: {m.name}: {field}", why) for path, m in pairs for field, why in check_local_inputs(m)]
    if refused:   # what an agent would refuse is refused here, before anything is uploaded
        raise ManifestError(refused)
    manifests = [m for _, m in pairs]
    identity = home().user_identity()
    address = home().default_board(hub_url)

    async def go(client: BoardClient) -> list[dict[str, Any]]:
        jobs = []
        for manifest, uploads in prepared:
            if uploads and not as_json:
                total = sum(p.stat().st_size for _, p in uploads)
                click.echo(f"uploading {len(uploads)} input file(s), {total / 2**20:.1f} MiB", err=True)
            await upload_inputs(client, uploads)   # inputs first: a failed upload creates no job
            job = await submit(client, make_envelope(identity, manifest))
            if not as_json:
                click.echo(f"submitted {job['id']} ({job['name']}: {job['n_tasks']} task"
                           f"{'s' if job['n_tasks'] != 1 else ''})")
            jobs.append(job)
        if wait:
            finals = []
            last = [""]

            def show(view: dict[str, Any]) -> None:
                line = _progress_line(view)
                if line != last[0] and not as_json:
                    click.echo(line, err=True)
                    last[0] = line

            for job in jobs:
                finals.append(await wait_job(client, job["id"], timeout_s, show))
            return finals
        return jobs

    bundles = Path(tempfile.mkdtemp(prefix="panal-code-"))
    try:
        # spec.code -> a reproducible bundle, named as input ``code`` and uploaded like any input
        prepared = [prepare_inputs(bundle_manifest(m, bundles)[0]) for m in manifests]
        views = run(with_client(address, go, insecure))
    finally:
        shutil.rmtree(bundles, ignore_errors=True)
    if as_json:
        print_json(views)
    if wait:
        states = {v["state"] for v in views}
        for v in views:
            if v.get("error"):
                click.echo(f"{v['id']}: {v['error']}", err=True)
        if "failed" in states:
            sys.exit(EXIT_FAILED)
        if "cancelled" in states:
            sys.exit(EXIT_CANCELLED)
        if states - {"succeeded"}:
            click.echo("timed out waiting for the job(s)", err=True)
            sys.exit(EXIT_TIMEOUT)


@click.command("jobs")
@hub_option
@insecure_option
@click.option("--state", default=None, help="Only jobs in this state.")
@click.option("--json", "as_json", is_flag=True)
def jobs_cmd(hub_url: str | None, insecure: bool, state: str | None, as_json: bool) -> None:
    """List jobs on the board."""
    query = f"state={state}" if state else ""

    async def go(client: BoardClient) -> list[dict[str, Any]]:
        reply = await client.call("GET", "/v1/jobs", query=query)
        jobs: list[dict[str, Any]] = reply["jobs"]
        return jobs

    jobs = run(with_client(home().default_board(hub_url), go, insecure))
    if as_json:
        print_json(jobs)
    else:
        console.print(jobs_table(jobs))


@click.command("job")
@click.argument("job_id")
@hub_option
@insecure_option
@click.option("--json", "as_json", is_flag=True)
def job_cmd(job_id: str, hub_url: str | None, insecure: bool, as_json: bool) -> None:
    """Show one job: its state, per-task table, and why queued tasks are waiting."""
    async def go(client: BoardClient) -> dict[str, Any]:
        job = (await client.call("GET", f"/v1/jobs/{job_id}"))["job"]
        job["task_list"] = (await client.call("GET", f"/v1/jobs/{job_id}/tasks"))["tasks"]
        return dict(job)

    job = run(with_client(home().default_board(hub_url), go, insecure))
    if as_json:
        print_json(job)
        return
    click.echo(f"{job['id']}  {job['name']}  kind={job['kind']}  state={job['state']}  priority={job['priority']}")
    if job.get("error"):
        click.echo(f"error: {job['error']}")
    if job.get("best"):
        click.echo(best_line(job["best"]))
    for reason in job.get("waiting_because", []):
        click.echo(f"waiting: {reason}")
    table = Table(box=None)
    for col in ("TASK", "STATE", "ATTEMPT", "AGENT", "PROGRESS", "ERROR"):
        table.add_column(col)
    for t in job["task_list"]:
        table.add_row(*map(plain, (t["idx"], t["state"], t["attempt"], (t["agent"] or "")[:16],
                                   f"{100 * t['progress']:.0f}%", (t.get("error") or "")[:60])))
    console.print(table)


def best_line(best: dict[str, Any]) -> str:
    """The job's best task so far by its manifest's ``spec.report`` (hub/best.py), for people."""
    params = ", ".join(f"{k}={v}" for k, v in (best.get("params") or {}).items())
    return (f"best: task {best['unit']} ({best['metric']}={best['value']:.6g}, {best['mode']} of the accepted "
            f"results)" + (f"  {params[:160]}" if params else ""))


@click.command("cancel")
@click.argument("job_id")
@hub_option
@insecure_option
def cancel_cmd(job_id: str, hub_url: str | None, insecure: bool) -> None:
    """Cancel a job (running tasks are stopped at their next heartbeat)."""
    async def go(client: BoardClient) -> dict[str, Any]:
        return dict((await client.call("DELETE", f"/v1/jobs/{job_id}"))["job"])

    job = run(with_client(home().default_board(hub_url), go, insecure))
    click.echo(f"{job['id']}: {job['state']}")


COMMANDS = [submit_cmd, jobs_cmd, job_cmd, cancel_cmd]
