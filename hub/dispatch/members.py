"""One member list of the tally (``tally.py``): capable connected agents by their keys, sorted, and the sums.

A key is an agent's seconds per unit of cost (a FLOP, a byte or a fixed second) on the device a task of the list's
requirements and precision would use, times its learned correction for the kind: a task costing ``c`` units runs
``c x key`` on it. The idle members' keys are one sorted list; members busy or paused until later are kept by
when they are free (and their keys, for an upper bound); members with a window by its end; keys too small or too
large for products to keep their precision apart, to be judged one by one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Container
from typing import TYPE_CHECKING, Any

from hub.dispatch.covers import ceil_count
from hub.dispatch.predict import base_seconds
from hub.fleet import available_until
from jobs.kinds.base import Cost

if TYPE_CHECKING:
    from hub.dispatch.predict import Predictor
    from hub.fleet import AgentState
    from jobs.requirements import Requirements

__all__ = ["FEW", "KEY_MAX", "KEY_MIN", "ROUNDS", "Members", "entry", "listed", "sums"]

#: per unit: the cost that measures it (base_seconds of it is the agent's seconds per unit)
_UNITS = {"flops": Cost(flops=1.0), "bytes": Cost(bytes=1.0), "seconds": Cost(seconds=1.0)}
_HALF_PARAMS = {"dtype": "float16"}
_FULL_PARAMS: dict[str, str] = {}
#: once this few keys still finish another task, the rest are summed key by key instead of per task count
FEW = 16
#: task counts summed by bisection at most (a job of 100,000 tasks and a few dozen very quick rivals)
ROUNDS = 256
#: keys judged one by one: products near under- or overflow lose the precision the bounds rely on
KEY_MIN, KEY_MAX = 1e-200, 1e200

def entry(key: float, a: float, cut: float) -> int:
    """How many ``k >= 1`` satisfy ``key < min(a / (k + 1e-9), cut)``: one key's share of :func:`sums`."""
    if not key < cut or not key < a / (1 + 1e-9):
        return 0
    if not key < a / (2 + 1e-9):
        return 1   # (most often: a rival about as quick as the asker)
    m = min(max(ceil_count(a / key - 1e-9) - 1, 1), 1 << 60)
    for _ in range(4):   # the estimate is within rounding of the boundary: move it onto the exact rule
        if not key < a / (m + 1e-9):
            m -= 1
        elif key < a / (m + 1 + 1e-9):
            m += 1
        else:
            break
    return max(m, 0)


def sums(keys: list[float], a_lo: float, a_hi: float, cut_lo: float, cut_hi: float,
         stop: float) -> tuple[int, int, bool]:
    """``sum over k of #{key < min(a / (k + 1e-9), cut)}`` for both bounds' ``a`` and ``cut`` (sorted ``keys``),
    and whether both are complete: the count stops once the lower one reaches ``stop``, or after :data:`ROUNDS`."""
    lo = hi = 0
    for k in range(1, ROUNDS + 1):
        d = k + 1e-9
        c_hi = bisect.bisect_left(keys, min(a_hi / d, cut_hi))
        if c_hi == 0:
            return lo, hi, True
        if c_hi <= FEW:   # the last few keys: each one's remaining count at once
            for key in keys[:c_hi]:
                hi += entry(key, a_hi, cut_hi) - (k - 1)
                lo += max(entry(key, a_lo, cut_lo) - (k - 1), 0)
            return lo, hi, True
        lo += bisect.bisect_left(keys, min(a_lo / d, cut_lo), 0, c_hi)
        hi += c_hi
        if lo >= stop:
            return lo, hi, False
    return lo, hi, False


def listed(key: float) -> bool:
    """Whether a key goes into the sorted lists. Outside them: 0, NaN, and keys from KEY_MAX up finish nothing
    first (a runtime of 0 or NaN counts none in the walk; the tally asks no horizon that long); a positive key up
    to KEY_MIN finishes endlessly many and is judged one by one (``odd``)."""
    return KEY_MIN < key < KEY_MAX


class Members:
    """The capable connected agents of one (requirements, kind, precision, unit) by their keys."""

    def __init__(self, req: Requirements, kind: str, half: bool, unit: str, capable: set[str]) -> None:
        self.req, self.kind, self.unit, self.capable = req, kind, unit, capable
        self.key = (req, kind, half, unit)
        self.live = True                             # False once dropped from its tally
        self.used = 0                                # the tally's question count when last asked
        self.picked = -1                             # the tally's pick count when last asked
        self.params = _HALF_PARAMS if half else _FULL_PARAMS
        self.other = "bytes" if unit == "flops" else "flops"
        self.idle: list[float] = []                  # keys of members free now, sorted
        self.waits: list[tuple[float, str]] = []      # (free at, id) of members free later, sorted
        self.wait_keys: list[float] = []              # their keys, sorted
        self.windows: list[tuple[float, str]] = []    # (window end, id) of members with a window, sorted
        self.odd: set[str] = set()                    # members whose keys are judged one by one (see listed)
        #: members ``adaptive`` may avoid for the kind (its error rates): in no sum but their own, counted as if
        #: idle in the upper bound only (so a fleet's hundreds of flaky agents are not judged one by one)
        self.flagged: set[str] = set()
        self.flag_keys: list[float] = []
        self.placed: dict[str, tuple[float, float, float]] = {}   # id -> (key, free at or -inf, window end or inf)
        self.units: dict[str, tuple[object, float, float]] = {}    # id -> (its caps, seconds per unit, per other)
        #: the largest ratio over members of seconds per ``other`` unit to seconds per unit: a task's ``other``
        #: cost sets no member's runtime while ``other_cost x ratio <= cost`` (members that left included)
        self.ratio = 0.0
        self.reports = -1                            # the report log, applied up to here

    def per_unit(self, agent: AgentState) -> float:
        kept = self.units.get(agent.row.id)
        if kept is not None and kept[0] is agent.caps:
            return kept[1]
        mine = base_seconds(_UNITS[self.unit], agent.caps, self.req, self.params)
        other = base_seconds(_UNITS[self.other], agent.caps, self.req, self.params) if self.unit != "seconds" else 0.0
        self.units[agent.row.id] = (agent.caps, mine, other)
        if other > 0 and mine > 0:
            self.ratio = max(self.ratio, other / mine)
        elif other > 0:
            self.ratio = math.inf
        return mine

    def _entries(self, agent_id: str, placed: tuple[float, float, float], flagged: bool) -> list[tuple[list[Any], Any]]:
        """The sorted lists a placement goes into, with its item in each (``odd`` and ``flagged`` apart)."""
        key, free, until = placed
        entries: list[tuple[list[Any], Any]] = [(self.windows, (until, agent_id))] if until != math.inf else []
        if not listed(key):
            pass
        elif flagged:
            entries.append((self.flag_keys, key))
        elif free == -math.inf:
            entries.append((self.idle, key))
        else:
            entries += [(self.waits, (free, agent_id)), (self.wait_keys, key)]
        return entries

    def _mark(self, agent_id: str, key: float, flagged: bool) -> None:
        if 0 < key <= KEY_MIN:
            self.odd.add(agent_id)
        elif flagged and listed(key):
            self.flagged.add(agent_id)

    def unplace(self, agent_id: str) -> None:
        placed = self.placed.pop(agent_id, None)
        if placed is None:
            return
        for sorted_list, item in self._entries(agent_id, placed, agent_id in self.flagged):
            del sorted_list[bisect.bisect_left(sorted_list, item)]
        self.odd.discard(agent_id)
        self.flagged.discard(agent_id)

    def placement(self, agent: AgentState, predictor: Predictor, now: float) -> tuple[float, float, float]:
        """(key, when it is free: -inf for now, window end or inf) of a capable connected agent not refused."""
        key = self.per_unit(agent) * predictor.factor(agent.row.id, self.kind)
        free = predictor.free_at(agent, now)
        until = available_until(agent)
        return (key, -math.inf if free <= now else free,
                until if until is not None and until < math.inf else math.inf)   # (NaN: never cuts, as misfit)

    def judge(self, agent_id: str, placed: tuple[float, float, float] | None, flagged: bool = False) -> None:
        """Move an agent to ``placed`` (None: out; ``flagged``: one ``adaptive`` may avoid), unless it is there."""
        if self.placed.get(agent_id) == placed and (agent_id in self.flagged) == flagged:
            return
        self.unplace(agent_id)
        if placed is None:
            return
        self.placed[agent_id] = placed
        self._mark(agent_id, placed[0], flagged)
        for sorted_list, item in self._entries(agent_id, placed, flagged):
            bisect.insort(sorted_list, item)

    def build(self, agents: list[AgentState], predictor: Predictor, now: float, flagged: Container[str] = ()) -> None:
        """Place ``agents`` (capable, connected, not refused) afresh, sorted once (their seconds per unit kept)."""
        if len(self.units) > 2 * len(agents) + 1024:   # agents gone since (a stranger's thousand registrations)
            kept = {a.row.id for a in agents}
            self.units = {i: u for i, u in self.units.items() if i in kept}
        self.idle, self.waits, self.wait_keys, self.windows = [], [], [], []
        self.odd, self.placed, self.flagged, self.flag_keys = set(), {}, set(), []
        for agent in agents:
            agent_id = agent.row.id
            placed = self.placed[agent_id] = self.placement(agent, predictor, now)
            self._mark(agent_id, placed[0], agent_id in flagged)
            for sorted_list, item in self._entries(agent_id, placed, agent_id in flagged):
                sorted_list.append(item)
        for sorted_list in (self.idle, self.waits, self.wait_keys, self.windows, self.flag_keys):
            sorted_list.sort()

    def due(self, now: float) -> list[str]:
        """Members whose predicted free time has passed (free now: judged again)."""
        waits = self.waits
        end = bisect.bisect_right(waits, (now, "\uffff"))
        return [agent_id for _, agent_id in waits[:end]]
