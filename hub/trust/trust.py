"""The board's trust part: instances of units, quorum validation, adaptive replication, spot checks,
reputation, consequences and credit (an agent's standing: :mod:`hub.trust.standing`). It is the board's
:class:`~hub.protocols.ResultValidator` (``judge``) and a :class:`~hub.protocols.Holdback` (an agent, and its
owner, never gets two instances of one unit), and the board tells it of leases and asks it for spot checks.

Replication is decided when a unit's first instance is leased (hub/trust/reputation.py), and the
extra instance is queued at once, so it runs in parallel with the first: no sequential latency.
Side effects that need the store (new instance rows, validation records, reputation, credit,
bans) are collected while judging (which is synchronous) and written by :meth:`Trust.flush`,
which the board awaits before it answers the request that caused them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from hub.protocols import ACCEPT, PENDING, Decision, Verdict
from hub.records import JobRow, ResultRow, TaskRow
from hub.trust.policy import ValidationPolicy
from hub.trust.records import TrustWrite, ValidationRow
from hub.trust.reputation import cost_units
from hub.trust.standing import Standing
from hub.trust.units import Answer, Outcome, Unit
from jobs.requirements import unmet
from security.records import SignedRecord, decode

if TYPE_CHECKING:
    from hub.config import HubConfig
    from hub.fleet import AgentState
    from hub.protocols import DispatchView
    from hub.quarantine import Quarantine
    from hub.queues import JobQueues
    from hub.store import Store

__all__ = ["Trust", "owner_of"]


def owner_of(agent: AgentState | None) -> str | None:
    """The agent's owner as its admission token says (``panal hub tokens create --owner``), if any: never
    what the agent claims of itself (a liar would claim none, or a victim's name)."""
    return agent.row.owner if agent is not None else None


class Trust:
    def __init__(self, config: HubConfig, clock: Callable[[], float], store: Store, queues: JobQueues,
                 agents: Callable[[], dict[str, AgentState]], quarantine: Quarantine,
                 rng: random.Random | None = None) -> None:
        self.config, self.clock, self.store, self.queues = config, clock, store, queues
        self._agents, self.quarantine = agents, quarantine
        self.rng = rng or random.Random()
        self.stats: dict[str, int] = {"validated": 0, "no_consensus": 0, "invalid": 0, "spot_checks": 0,
                                      "instances_added": 0, "unreplicated": 0}
        self.standing = Standing(config, clock, queues, quarantine, self.rng, self.stats)
        self.reputation, self.speed = self.standing.reputation, self.standing.speed
        self.credit, self.invalid_counts = self.standing.credit, self.standing.invalid_counts
        self.units: dict[tuple[str, int], Unit] = {}
        self._unit_of: dict[str, Unit] = {}                  # task id -> its unit
        self._contested: set[str] = set()                    # rows of units with several instances
        self._validated: dict[str, list[Unit]] = {}          # job id -> validated units (spot-check pool)
        self._verdicts: dict[str, Verdict] = {}              # held task id -> its verdict, once decided
        self._cancels: list[str] = []                        # instances no longer needed
        self._more: list[Unit] = []                          # units that need one more instance
        self._write = TrustWrite()

    # -- life cycle -----------------------------------------------------------------------------------
    async def start(self, jobs: Iterable[JobRow], tasks: Iterable[TaskRow]) -> None:
        self.standing.load(await self.store.load_trust())
        by_job: dict[str, list[TaskRow]] = {}
        for task in tasks:
            by_job.setdefault(task.job_id, []).append(task)
        for job in jobs:
            self.add_job(job, by_job.get(job.id, []))
            for record in await self.store.get_validations(job.id):
                unit = self.units.get((job.id, record.unit))
                if unit is not None and record.state == "validated" and record.canonical_task:
                    unit.state = "validated"
                    unit.canonical = Answer(record.canonical_task, record.agents[0] if record.agents else "", None,
                                            dict(record.detail.get("values") or {}))
                    self._validated.setdefault(job.id, []).append(unit)

    def add_job(self, job: JobRow, tasks: Iterable[TaskRow]) -> None:
        """Index a job's instance rows (a new job, or an active one at start)."""
        policy = ValidationPolicy.from_dict(job.validation)
        for task in tasks:
            unit = self.units.get((job.id, task.unit_idx))
            if unit is None:
                unit = self.units[job.id, task.unit_idx] = Unit(job.id, task.unit_idx, job.kind, policy,
                                                                needed=policy.quorum if not policy.adaptive else 1,
                                                                decided=not policy.adaptive or not policy.enabled)
            self._index(unit, task)
            if task.agent_id:
                self._ran(unit, task.agent_id)

    def _index(self, unit: Unit, task: TaskRow) -> None:
        unit.instances.append(task.id)
        self._unit_of[task.id] = unit
        if len(unit.instances) > 1:   # the new row is not queued yet: it counts as live, not as terminal
            self._contested.update(t for t in unit.instances if t == task.id or not self._terminal(t))
        if unit.policy.enabled and len(unit.instances) > 1:
            unit.needed = max(unit.needed, unit.policy.quorum)

    def _terminal(self, task_id: str) -> bool:
        task = self.queues.task(task_id)
        return task is None or task.state.terminal

    def _ran(self, unit: Unit, agent_id: str) -> None:
        unit.ran.add(agent_id)
        owner = owner_of(self._agents().get(agent_id))
        if owner:
            unit.owners.add(owner)

    def forget(self, job: JobRow) -> None:
        """The job finished: drop its units."""
        for key in [k for k in self.units if k[0] == job.id]:
            unit = self.units.pop(key)
            for task_id in unit.instances:
                self._unit_of.pop(task_id, None)
                self._contested.discard(task_id)
                self._verdicts.pop(task_id, None)
                self.speed.forget(task_id)
        self._validated.pop(job.id, None)

    # -- leasing: holdback, screening, replication, spot checks ----------------------------------------
    def _excluded(self, unit: Unit, agent: AgentState) -> bool:
        owner = owner_of(agent)
        return agent.row.id in unit.ran or (owner is not None and owner in unit.owners)

    def why_waiting(self, task_id: str, capable: Sequence[AgentState]) -> str | None:
        """Why none of the capable connected agents may take this queued instance: each already ran
        (or its owner ran) an instance of its unit. A quorum of 2 on a board with one agent says so
        here (the job view's ``waiting_because``) instead of waiting silently."""
        unit = self._unit_of.get(task_id)
        if unit is None or not unit.policy.enabled or not capable:
            return None
        if any(not self._excluded(unit, agent) for agent in capable):
            return None
        return (f"needs an answer from another agent: results are accepted when {unit.policy.quorum} agents "
                f"(of different owners) agree, and the {len(capable)} capable connected agent(s) already ran this "
                "task; connect another agent, or submit with policy.validation.quorum: 1 on a board you trust")

    def held_back(self, agent: AgentState, view: DispatchView) -> Iterable[str]:
        """Queued instances of units this agent (or its owner) already ran an instance of."""
        for task_id in list(self._contested):
            unit = self._unit_of.get(task_id)
            if unit is None or self._terminal(task_id):
                self._contested.discard(task_id)
            elif self._excluded(unit, agent) and self.queues.is_queued(task_id):
                yield task_id

    def screen(self, agent: AgentState, picked: Sequence[TaskRow]) -> tuple[list[TaskRow], list[TaskRow]]:
        """Split a pick into what the agent may have and what goes back: never two instances of one unit."""
        keep: list[TaskRow] = []
        back: list[TaskRow] = []
        units: set[tuple[str, int]] = set()
        for task in picked:
            unit = self._unit_of.get(task.id)
            if unit is not None and unit.policy.enabled and (unit.key in units or (
                    self._excluded(unit, agent) and task.agent_id != agent.row.id)):
                back.append(task)
                continue
            if unit is not None:
                units.add(unit.key)
            keep.append(task)
        return keep, back

    async def leased(self, agent: AgentState, tasks: Sequence[TaskRow]) -> None:
        """Tasks were leased to the agent: remember who ran what; decide replication of new units."""
        for task in tasks:
            self.speed.leased(task.id)
            unit = self._unit_of.get(task.id)
            if unit is None:
                continue
            newcomer = agent.row.id not in unit.ran
            self._ran(unit, agent.row.id)
            if unit.settled or not unit.policy.enabled:
                continue
            # Replication is decided for the agent that runs the unit: a unit left unreplicated for a trusted
            # agent is decided again when another agent takes it over (a released or expired lease, a retry),
            # else a stranger's lone answer would be accepted on the first lessee's reputation.
            if unit.decided and not (newcomer and unit.needed < unit.policy.quorum):
                continue
            unit.decided = True
            if self.reputation.replicate(agent.row.id, unit.kind):
                unit.needed = unit.policy.quorum
                self._more.extend([unit] * (unit.policy.quorum - len(unit.instances)))
            else:
                self.stats["unreplicated"] += 1
        await self.flush()

    def spot_candidate(self, agent: AgentState) -> Unit | None:
        """A validated unit this agent never ran, of an active job it can run, to re-run as a spot check."""
        if self.config.spot_check_share <= 0 or not self._validated:
            return None
        if self.rng.random() >= self.config.spot_check_share:
            return None
        jobs = [j for j in self._validated if self.queues.queued(j)]
        self.rng.shuffle(jobs)
        for job_id in jobs[:4]:
            job = self.queues.get_job(job_id)
            if job is None or unmet(self.queues.requirements(job_id), job.kind, agent.caps):
                continue
            if self.reputation.trusted(agent.row.id, job.kind):
                continue   # spot checks are for agents without a run of valid results
            pool = self._validated[job_id]
            for unit in self.rng.sample(pool, min(4, len(pool))):
                if not self._excluded(unit, agent) and len(unit.instances) < unit.policy.max_instances + 2:
                    return unit
        return None

    def new_instance(self, unit: Unit) -> TaskRow:
        """A new queued row of ``unit`` (the caller stores and queues it)."""
        job = self.queues.job(unit.job_id)
        first = self.queues.task(unit.instances[0])
        assert first is not None
        task = TaskRow(id=f"{job.id}.{job.n_tasks}", job_id=job.id, idx=job.n_tasks, params=first.params,
                       updated_at=self.clock(), unit=unit.idx)
        job.n_tasks += 1
        self._index(unit, task)
        self.stats["instances_added"] += 1
        return task

    async def add_rows(self, job: JobRow, rows: list[TaskRow]) -> None:
        """Store new instance rows and queue them first in their job's line: a second instance should run
        alongside the first, not after the rest of the job's units."""
        await self.store.add_tasks(rows, [job])
        self.queues.add_tasks(rows)
        self.queues.restore(self.queues.withhold(row.id for row in rows))

    # -- judging ----------------------------------------------------------------------------------------
    def judge(self, job: JobRow, task: TaskRow, result: ResultRow) -> Verdict:
        """The ResultValidator: this result's verdict now (the ledger asks again for held ones)."""
        decided = self._verdicts.pop(task.id, None)
        if decided is not None:
            return decided
        self.speed.observed(self._agents().get(result.agent_id), job.kind, task)
        unit = self._unit_of.get(task.id)
        if unit is None:
            return ACCEPT
        if not unit.policy.enabled:   # a quorum of 1: the board accepts each result as it is, and credits it
            agent = self._agents().get(result.agent_id)
            units = cost_units(unit.kind, task.params)
            self._write.credit += self.credit.grant(result.agent_id, owner_of(agent), units)
            return ACCEPT
        if any(a.task_id == task.id for a in unit.answers):
            return PENDING   # already judged and held: no verdict yet
        answer = self._answer(unit, result)
        unit.answers.append(answer)
        if unit.settled:   # a spot check (or a late instance) of a unit already answered
            return self._late(unit, answer)
        outcome, group, why = unit.decide()
        if outcome == Outcome.WAIT:
            return PENDING
        if outcome == Outcome.MORE:
            self._more.append(unit)
            return PENDING
        verdicts = self._settle(unit, outcome, group, why)
        mine = verdicts.pop(task.id)
        self._verdicts.update(verdicts)
        return mine

    def _answer(self, unit: Unit, result: ResultRow) -> Answer:
        # the ledger verified this record's signature when it arrived (ResultRow is built from that receipt):
        # decoding it again is enough, a second Ed25519 check per result is not needed
        decoded = decode(SignedRecord.from_wire(result.record).payload)
        payload: dict[str, Any] = decoded if isinstance(decoded, dict) else {}
        values = payload.get("values")
        env = payload.get("environment") if isinstance(payload.get("environment"), dict) else {}
        on_gpu = bool(env and env.get("cuda") and env.get("gpus"))
        agent = self._agents().get(result.agent_id)
        return Answer(result.task_id, result.agent_id, owner_of(agent),
                      dict(values) if isinstance(values, dict) else {}, on_gpu,
                      self.reputation.suspect(result.agent_id, unit.kind))

    def _late(self, unit: Unit, answer: Answer) -> Verdict:
        assert unit.canonical is not None
        why = unit.agrees(unit.canonical, answer)
        self.stats["spot_checks"] += 1
        if why is None:
            self.standing.valid(self._write, unit, answer, credit=True)
            return ACCEPT
        self.standing.invalid(self._write, unit, answer, why)
        return Verdict(Decision.INVALID, f"disagrees with the validated answer: {why}")

    def _settle(self, unit: Unit, outcome: Outcome, group: list[Answer], why: str) -> dict[str, Verdict]:
        now = self.clock()
        verdicts: dict[str, Verdict] = {}
        if outcome == Outcome.VALIDATED:
            unit.state, unit.canonical = "validated", group[0]
            self.stats["validated"] += 1
            checked = unit.needed > 1
            members = {a.task_id for a in group}
            for answer in unit.answers:
                if answer.task_id in members:
                    verdicts[answer.task_id] = ACCEPT
                    self.standing.valid(self._write, unit, answer, credit=True, counts=checked)
                else:
                    reason = unit.agrees(group[0], answer) or "disagrees with the quorum"
                    verdicts[answer.task_id] = Verdict(Decision.INVALID, f"disagrees with the quorum: {reason}")
                    self.standing.invalid(self._write, unit, answer, reason)
            self._validated.setdefault(unit.job_id, []).append(unit)
            answered = {a.task_id for a in unit.answers}
            self._cancels += [t for t in unit.instances if t not in answered and not self._terminal(t)]
            self._write.validations.append(ValidationRow(
                unit.job_id, unit.idx, "validated", unit.needed, group[0].task_id,
                [a.agent_id for a in group], {"values": group[0].values,
                                              "invalid": [_brief(a) for a in unit.answers if a.task_id not in members]},
                now))
        else:
            unit.state = "no_consensus"
            self.stats["no_consensus"] += 1
            reason = f"no consensus among {len(unit.answers)} instances: {why}"
            for answer in unit.answers:
                verdicts[answer.task_id] = Verdict(Decision.FAIL, reason)
            self._write.validations.append(ValidationRow(
                unit.job_id, unit.idx, "no_consensus", unit.needed, None, [],
                {"answers": [_brief(a) for a in unit.answers], "reason": reason}, now))
        return verdicts

    def closed(self, task: TaskRow) -> None:
        """An instance ended without an answer (failed for good, cancelled)."""
        unit = self._unit_of.get(task.id)
        if unit is not None:
            unit.closed.add(task.id)

    def take_cancels(self) -> list[str]:
        out, self._cancels = self._cancels, []
        return out

    async def flush(self) -> None:
        """Store new instance rows and the trust records collected since the last flush."""
        more, self._more = self._more, []
        rows: dict[str, list[TaskRow]] = {}
        for unit in more:
            job = self.queues.get_job(unit.job_id)
            if job is None or unit.settled:
                continue
            rows.setdefault(job.id, []).append(self.new_instance(unit))
        for job_id, new in rows.items():
            await self.add_rows(self.queues.job(job_id), new)
        write, self._write = self._write, TrustWrite()
        if write:
            await self.store.record_trust(write)

    # -- views ------------------------------------------------------------------------------------------
    def agent_view(self, agent_id: str) -> dict[str, Any]:
        return self.standing.view(agent_id)

    def job_units(self, job_id: str) -> list[dict[str, Any]]:
        """The live validation state of an active job's units."""
        out = []
        for (job, idx), unit in sorted(self.units.items()):
            if job != job_id:
                continue
            out.append({"unit": idx, "state": unit.state, "quorum": unit.needed, "instances": len(unit.instances),
                        "answers": len(unit.answers),
                        "agents": [unit.canonical.agent_id] if unit.canonical else []})
        return out


def _brief(answer: Answer) -> dict[str, Any]:
    return {"agent": answer.agent_id, "task": answer.task_id, "values": answer.values}
