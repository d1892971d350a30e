"""Policy runs and hub CPU per new task while many agents long-poll (the real Board and store).

``python -m agent.tools.sim_wakeups --parked 2000 --jobs 20``: registers the agents, parks one long-poll
each, then submits one-task jobs one at a time and waits for each to be leased. Before the wake index
every submission woke every parked poll (each ran the policy and found nothing); now one is woken. Only
the Board's public calls are used, so an older checkout can be measured with the same file.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from agent.client.submitting import make_envelope
from hub.board import Board
from hub.config import HubConfig
from hub.sqlite_store import SqliteStore
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.requirements import Capabilities
from security.identity import Identity

__all__ = ["measure_wakeups"]


async def measure_wakeups(parked: int, jobs: int) -> dict[str, float]:
    """Policy runs per task and hub CPU ms per task (submission, wake-ups, picks, lease commits)."""
    with tempfile.TemporaryDirectory(prefix="panal-wake-") as directory:
        board = Board(SqliteStore(Path(directory) / "b.db"), HubConfig(max_poll_wait_s=600), time.time)
        await board.start()
        try:
            agents = [Identity.generate() for _ in range(parked)]
            await asyncio.gather(*(board.register_agent(a.public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
                                   for a in agents))
            picks: list[float] = []
            all_parked = asyncio.Event()

            def timed(seconds: float) -> None:
                picks.append(seconds)
                if len(picks) >= parked:
                    all_parked.set()

            board.time_dispatch(timed)
            polls: set[asyncio.Task[list[Assignment]]] = {asyncio.create_task(board.lease(a.id, 1, 600))
                                                           for a in agents}
            await all_parked.wait()          # every poll looked once and parked
            picks.clear()
            user = Identity.generate()
            cpu0, taken = time.process_time(), 0
            for j in range(jobs):
                manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": f"w{j}"},
                                               "spec": {"task": "sleep", "params": {"seconds": 0}}})
                await board.submit(make_envelope(user, manifest), user.id)
                while taken <= j:
                    done, polls = await asyncio.wait(polls, return_when=asyncio.FIRST_COMPLETED)
                    taken += sum(len(p.result()) for p in done)
            cpu = time.process_time() - cpu0
            for poll in polls:
                poll.cancel()
            await asyncio.gather(*polls, return_exceptions=True)
            return {"parked": parked, "jobs": jobs, "policy_runs_per_task": len(picks) / jobs,
                    "cpu_ms_per_task": 1000 * cpu / jobs}
        finally:
            await board.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m agent.tools.sim_wakeups", description=__doc__.split("\n")[0])
    parser.add_argument("--parked", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    print(asyncio.run(measure_wakeups(args.parked, args.jobs)))


if __name__ == "__main__":
    main()
