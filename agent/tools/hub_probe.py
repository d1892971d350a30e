"""A hub process measured from outside, as the benchmarks that run one read it: CPU seconds, resident memory,
its ``/metrics`` counters and histograms, and percentiles of what the benchmark itself timed.

``panal bench fleet`` and ``panal bench abuse`` both start a real ``panal hub serve`` process and report what
it cost; they read it the same way, here, so that their figures mean the same thing (user + system CPU
seconds of the process, RSS from the kernel, a histogram quantile interpolated as Prometheus does).
"""

from __future__ import annotations

import asyncio
import contextlib

import psutil

from agent.client.board import BoardClient

__all__ = ["CpuWatch", "HubProcess", "RssWatch", "pct", "quantile_ms"]


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile of ``values`` (nearest rank), to 0.01; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)


class HubProcess:
    """The hub process as this machine sees it: CPU seconds, RSS and its ``/metrics`` counters."""

    def __init__(self, pid: int, client: BoardClient) -> None:
        self.proc, self.client = psutil.Process(pid), client

    def cpu_s(self) -> float:
        times = self.proc.cpu_times()
        return float(times.user + times.system)

    def rss_mb(self) -> float:
        return round(self.proc.memory_info().rss / 2**20, 1)

    async def scrape(self) -> list[str]:
        async with self.client.session().get(self.client.address.url + "/metrics") as response:
            return (await response.text()).splitlines()

    @staticmethod
    def counter(lines: list[str], name: str) -> float:
        for line in lines:
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise RuntimeError(f"{name} is not in the hub's /metrics")

    @staticmethod
    def buckets(lines: list[str], name: str) -> list[tuple[float, float]]:
        """A histogram's cumulative buckets, (upper bound, count) in order, ``+Inf`` last."""
        prefix = name + '_bucket{le="'
        out = [(float(line[len(prefix):].split('"', 1)[0]), float(line.split()[-1]))
               for line in lines if line.startswith(prefix)]
        if not out:
            raise RuntimeError(f"{name} is not in the hub's /metrics")
        return out


def quantile_ms(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of what a histogram observed between two scrapes, interpolated within its bucket (as
    Prometheus' ``histogram_quantile``): as fine as the buckets (hub/metrics.py ``SERVICE_BUCKETS``)."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1]
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le, cumulative in counts:
        if cumulative >= rank:
            if le == float("inf"):
                return round(lower * 1000, 2)
            inside = cumulative - below
            share = (rank - below) / inside if inside else 1.0
            return round((lower + (le - lower) * share) * 1000, 2)
        lower, below = le, cumulative
    return None


class RssWatch:
    """The hub's peak resident memory, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0

    async def run(self, stop_at: asyncio.Event) -> None:
        while not stop_at.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_at.wait(), 0.2)


class CpuWatch:
    """CPU seconds (user + system) each process spent since the last lap: on a machine whose cores the
    hub shares with the load generator and the attacker, they say who the cores went to."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.procs: dict[str, psutil.Process] = {}
        self.last: dict[str, float] = {}
        for name, pid in pids.items():
            self.watch(name, pid)
        self.last["machine"] = self._machine_busy()

    def watch(self, name: str, pid: int | None) -> None:
        with contextlib.suppress(psutil.Error, TypeError):
            self.procs[name] = psutil.Process(pid)
            self.last[name] = self._total(self.procs[name])

    @staticmethod
    def _total(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    def lap(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                now = self._total(proc)
                out[name] = round(now - self.last[name], 1)
                self.last[name] = now
        # everything else on the machine (other work sharing the cores): busy CPU seconds not counted above
        busy = self._machine_busy()
        out["others"] = round(max(0.0, busy - self.last.get("machine", busy) - sum(out.values())), 1)
        self.last["machine"] = busy
        return out

    @staticmethod
    def _machine_busy() -> float:
        times = psutil.cpu_times()   # user includes guest time on Linux; steal is not this machine's work
        return float(sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq")))
