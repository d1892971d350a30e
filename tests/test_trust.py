"""Results you can trust (hub/trust/), on a real Board + SQLite store: instances of a unit on different
agents, quorum, invalid instances, no consensus, adaptive replication, spot checks, reputation, credit
and quarantine kept across a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock

from agent.client.submitting import make_envelope
from hub.board import Board
from hub.config import HubConfig
from hub.records import TaskState
from hub.sqlite_store import SqliteStore
from hub.trust.records import ReputationRow, TrustWrite
from jobs.manifest import Manifest
from jobs.protocol import Assignment
from jobs.requirements import Capabilities
from security.identity import Identity
from security.records import SignedRecord

HONEST = {"slept": 0.0}
LIE = {"slept": 42.0}
T0 = 1_000_000.0   # the boards' virtual start time


class Fleet:
    """A board and named agents that report chosen values."""

    def __init__(self, board: Board, agents: dict[str, Identity]) -> None:
        self.board, self.agents = board, agents
        self.user = Identity.generate()

    async def submit(self, n: int = 1, seconds: float = 0.0, **policy: Any) -> str:
        m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "t"},
                                "spec": {"task": "sleep", "sweep": {"seconds": [seconds] * n},
                                         "policy": {"retries": 2, **policy}}})
        job, _ = await self.board.submit(make_envelope(self.user, m), self.user.id)
        return job.id

    def id(self, name: str) -> str:
        return self.agents[name].id

    async def lease(self, name: str, slots: int = 1) -> list[Assignment]:
        return await self.board.lease(self.id(name), slots, 0)

    async def report(self, name: str, task: Assignment, values: dict[str, Any] | None = None) -> dict[str, Any]:
        agent = self.agents[name]
        payload = {"task_id": task.task_id, "job_id": task.job_id, "lease_id": task.lease_id,
                   "attempt": task.attempt, "agent_id": agent.id, "status": "ok",
                   "values": HONEST if values is None else values, "metrics": {"wall_s": 1.0}}
        [outcome] = await self.board.accept(agent.id, [SignedRecord.sign(agent, payload)])
        return outcome.encode()

    async def state(self, task_id: str) -> TaskState:
        """The task's state, live or (once its job finished) as stored."""
        task = self.board.view.task(task_id)
        if task is None:
            [task] = [t for t in await self.board.store.get_tasks(task_id.split(".")[0]) if t.id == task_id]
        return task.state


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Any]:
    boards: list[Board] = []
    identities = {name: Identity.generate() for name in ("a", "b", "c", "d")}

    async def build(owners: dict[str, str] | None = None, **settings: Any) -> Fleet:
        config = HubConfig(lease_ttl_s=10, retry_backoff_s=0, expiry_interval_s=3600, spot_check_share=0.0,
                           **settings)
        board = Board(SqliteStore(tmp_path / "board.db"), config, FakeClock(T0))
        await board.start()
        boards.append(board)
        for name, ident in identities.items():
            await board.register_agent(ident.public, name, Capabilities.from_dict({"kinds": ["sleep"]}),
                                       owner=(owners or {}).get(name))
        return Fleet(board, identities)

    yield build
    for board in boards:
        if board.store is not None:
            await board.stop()


async def test_one_agent_never_gets_two_instances_of_one_unit(fleet: Any) -> None:
    f = await fleet()
    await f.submit(1, replicas=2)
    [first] = await f.lease("a", slots=2)      # two instances queued, two slots: it still gets one
    assert await f.lease("a") == []            # the other instance is kept from it
    [second] = await f.lease("b")
    assert second.idx == first.idx == 0 and second.task_id != first.task_id   # the same unit, named by its point


async def test_instances_of_one_owner_never_make_a_quorum(fleet: Any) -> None:
    f = await fleet(owners={"a": "alice", "b": "alice"})
    await f.submit(1, replicas=2)
    await f.lease("a")
    assert await f.lease("b") == []            # another machine of the same owner
    assert len(await f.lease("c")) == 1


async def test_the_quorum_answer_wins_and_the_liar_is_invalid_without_credit(fleet: Any) -> None:
    f = await fleet()
    job_id = await f.submit(1, seconds=2.0, validation={"quorum": 2, "adaptive": False})
    [ta] = await f.lease("a")
    [tb] = await f.lease("b")
    assert (await f.report("a", ta, {"slept": 2.0}))["status"] == "pending"
    assert (await f.report("b", tb, {"slept": 42.0}))["status"] == "pending"   # disagree: a third instance
    [tc] = await f.lease("c")
    assert tc.idx == 0 and tc.task_id not in (ta.task_id, tb.task_id)
    assert (await f.report("c", tc, {"slept": 2.0}))["status"] == "accepted"
    assert await f.state(ta.task_id) == TaskState.DONE and await f.state(tb.task_id) == TaskState.INVALID
    view = await f.board.job_view(job_id)
    assert view["state"] == "succeeded", view
    [record] = await f.board.store.get_validations(job_id)
    assert record.state == "validated" and set(record.agents) == {f.id("a"), f.id("c")}
    assert record.detail["values"] == {"slept": 2.0} and record.detail["invalid"][0]["agent"] == f.id("b")
    trust = f.board.trust
    assert trust.agent_view(f.id("a"))["credit"] == trust.agent_view(f.id("c"))["credit"] == 2.0   # sleep: 1/s
    assert trust.agent_view(f.id("b"))["credit"] == 0.0 and trust.agent_view(f.id("b"))["invalid_results"] == 1
    stored = {r.task_id: r.agent_id for r in await f.board.view.results(job_id)}
    assert stored[tb.task_id] == f.id("b")   # the liar's signed answer is kept as evidence


async def test_a_unit_without_consensus_fails_after_max_instances(fleet: Any) -> None:
    f = await fleet()
    job_id = await f.submit(1, validation={"quorum": 2, "max_instances": 2, "adaptive": False})
    [ta] = await f.lease("a")
    [tb] = await f.lease("b")
    await f.report("a", ta, {"slept": 1.0})
    outcome = await f.report("b", tb, {"slept": 2.0})
    assert outcome["status"] == "rejected"
    view = await f.board.job_view(job_id)
    assert view["state"] == "failed" and "no consensus" in view["error"]
    [record] = await f.board.store.get_validations(job_id)
    assert record.state == "no_consensus"
    assert sorted(a["values"]["slept"] for a in record.detail["answers"]) == [1.0, 2.0]
    assert await f.lease("c") == []          # no instance beyond max_instances


async def test_a_new_agents_unit_gets_a_second_instance_at_once_that_runs_in_parallel(fleet: Any) -> None:
    f = await fleet(validation_quorum=2)
    job_id = await f.submit(3)
    [ta] = await f.lease("a")                  # a has no record: its unit is replicated now, not after
    assert ta.idx == 0 and (await f.board.job_view(job_id))["n_tasks"] == 4
    [tb] = await f.lease("b")                  # first in line, ahead of units 1 and 2: runs alongside a's
    assert tb.idx == 0 and await f.state(ta.task_id) == TaskState.LEASED
    assert (await f.report("b", tb))["status"] == "pending"
    assert (await f.report("a", ta))["status"] == "accepted"
    [record] = await f.board.store.get_validations(job_id)
    assert record.unit == 0 and set(record.agents) == {f.id("a"), f.id("b")}
    assert f.board.trust.reputation.row(f.id("a"), "sleep").consecutive_valid == 1


async def test_a_trusted_agents_work_runs_unreplicated_and_one_invalid_resets_its_run(tmp_path: Path,
                                                                                      fleet: Any) -> None:
    f = await fleet(validation_quorum=2)
    await f.board.store.record_trust(TrustWrite(reputation=[ReputationRow(f.id("a"), "sleep", 10**9, 10**9, 0)]))
    await f.board.stop()
    f = await fleet(validation_quorum=2)       # restarted: the run was read back from the store
    job_id = await f.submit(1)
    [ta] = await f.lease("a")
    assert (await f.board.job_view(job_id))["n_tasks"] == 1     # replicated with probability 10/1e9
    assert (await f.report("a", ta))["status"] == "accepted"
    trust = f.board.trust
    assert trust.reputation.trusted(f.id("a"), "sleep")
    # Caught once (a spot check of a validated unit disagrees): the run starts over, work is replicated again.
    job_id = await f.submit(1, validation={"quorum": 2, "adaptive": False})
    [tb] = await f.lease("b")
    [ta] = await f.lease("a")
    await f.report("b", tb)
    await f.report("a", ta, LIE)
    [tc] = await f.lease("c")
    await f.report("c", tc)
    assert not trust.reputation.trusted(f.id("a"), "sleep")
    assert trust.reputation.row(f.id("a"), "sleep").consecutive_valid == 0
    job_id = await f.submit(1, seconds=3.0)
    [ta] = await f.lease("a")
    [tb] = await f.lease("b")                  # a's new unit has a second instance again
    assert ta.job_id == tb.job_id == job_id and tb.idx == 0 and tb.task_id != ta.task_id


async def test_spot_checks_give_an_untrusted_agent_a_validated_unit_and_catch_a_lie(fleet: Any) -> None:
    f = await fleet()
    job_id = await f.submit(3, validation={"quorum": 2, "adaptive": False})
    [ta] = await f.lease("a")                  # unit 0's first instance
    tb = (await f.lease("b", slots=3))[-1]     # units 1, 2, and unit 0's second instance
    assert tb.idx == 0
    await f.report("a", ta)
    await f.report("b", tb)                    # unit 0 is validated; units 1 and 2 have queued instances
    f.board.config = f.board.trust.config = HubConfig(spot_check_share=1.0)
    [check] = await f.lease("c")               # every lease of an untrusted agent is a spot check now
    assert check.idx == 0 and check.task_id.split(".")[1] == "6"   # a new instance of unit 0
    outcome = await f.report("c", check, LIE)
    assert outcome["status"] == "rejected" and await f.state(check.task_id) == TaskState.INVALID
    assert f.board.trust.stats["spot_checks"] == 1
    assert f.board.trust.agent_view(f.id("c"))["invalid_results"] == 1
    assert (await f.board.job_view(job_id))["state"] == "running"


async def test_repeated_invalid_results_quarantine_the_agent_across_a_restart(fleet: Any) -> None:
    f = await fleet(invalid_quarantine_after=1)
    await f.submit(1, validation={"quorum": 2, "adaptive": False})
    [ta] = await f.lease("a")
    [tb] = await f.lease("b")
    await f.report("a", ta)
    await f.report("b", tb, LIE)
    [tc] = await f.lease("c")
    await f.report("c", tc)
    credit_a = f.board.trust.agent_view(f.id("a"))["credit"]
    await f.board.stop()
    f = await fleet(invalid_quarantine_after=1)
    await f.submit(2)
    assert await f.lease("b") == []
    refused = f.board.view.agents[f.id("b")].refused
    assert refused is not None and "invalid" in refused
    assert f.board.trust.agent_view(f.id("a"))["credit"] == credit_a
    assert f.board.trust.agent_view(f.id("b"))["invalid_results"] == 1


async def test_a_quarantined_agent_gets_no_spot_checks_either(fleet: Any) -> None:
    f = await fleet(invalid_quarantine_after=1)
    await f.submit(3, validation={"quorum": 2, "adaptive": False})
    [ta] = await f.lease("a")
    tc = (await f.lease("c", slots=3))[-1]
    await f.report("a", ta)
    await f.report("c", tc)                    # unit 0 is validated; b never ran it
    await f.submit(1, seconds=1.0, priority=10, validation={"quorum": 2, "adaptive": False})
    [tb] = await f.lease("b")
    [td] = await f.lease("d")
    await f.report("b", tb, LIE)
    await f.report("d", td, {"slept": 1.0})
    [ta] = await f.lease("a")
    await f.report("a", ta, {"slept": 1.0})    # b is outvoted and quarantined
    assert f.board.quarantine.quarantined(f.id("b"))
    f.board.config = f.board.trust.config = HubConfig(spot_check_share=1.0, invalid_quarantine_after=1)
    assert await f.lease("b") == []


async def test_an_agent_far_slower_than_its_claim_is_placed_by_the_observed_speed_and_flagged(fleet: Any) -> None:
    f = await fleet()
    liar = f.agents["a"]
    await f.board.register_agent(liar.public, "boaster", Capabilities.from_dict(
        {"kinds": ["matmul"], "cpu": {"cores": 4, "gflops_fp32": 50_000.0}}))
    m = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job", "metadata": {"name": "mm"},
                            "spec": {"task": "matmul", "params": {"size": 1024, "iterations": 10},
                                     "sweep": {"seed": [1, 2, 3, 4]}}})
    await f.board.submit(make_envelope(f.user, m), f.user.id)
    clock = f.board.clock
    assert isinstance(clock, FakeClock)
    for _ in range(3):                          # 21.5 GFLOP each, 10 s from lease to result: ~2 GFLOPS
        [task] = await f.lease("a")
        clock.now += 10.0
        await f.report("a", task, {"checksum": 1.0, "abs_sum": 2.0, "dtype": "float32", "digest": "0" * 64})
    agent = f.board.view.agents[f.id("a")]
    assert agent.caps.cpu_gflops == pytest.approx(2.147, rel=1e-2)
    flag = f.board.trust.agent_view(f.id("a"))["speed_flag"]
    assert flag is not None and "50000" in flag
    await f.board.register_agent(liar.public, "boaster", Capabilities.from_dict(
        {"kinds": ["matmul"], "cpu": {"cores": 4, "gflops_fp32": 50_000.0}}))
    assert f.board.view.agents[f.id("a")].caps.cpu_gflops < 3     # claiming again changes nothing


async def test_an_instance_held_for_validation_runs_again_after_a_restart(fleet: Any) -> None:
    f = await fleet()
    job_id = await f.submit(1, validation={"quorum": 2, "adaptive": False})
    [ta] = await f.lease("a")
    assert (await f.report("a", ta))["status"] == "pending"     # held in memory only
    await f.board.stop()
    f = await fleet()
    clock = f.board.clock
    assert isinstance(clock, FakeClock)
    clock.now += 60                            # the restored lease of a's instance runs out: requeued
    await f.board.sweep()
    assert await f.lease("a") == []            # a ran an instance of this unit: it gets neither again
    [tb] = await f.lease("b")
    [tc] = await f.lease("c")
    assert {tb.task_id, tc.task_id} == {f"{job_id}.0", f"{job_id}.1"}
    await f.report("b", tb)
    assert (await f.report("c", tc))["status"] == "accepted"
    assert (await f.board.job_view(job_id))["state"] == "succeeded"


async def test_a_quorum_that_one_connected_agent_cannot_meet_says_why_the_job_waits(tmp_path: Path) -> None:
    board = Board(SqliteStore(tmp_path / "board.db"), HubConfig(lease_ttl_s=10, spot_check_share=0.0), FakeClock(T0))
    await board.start()
    try:
        solo = Identity.generate()
        await board.register_agent(solo.public, "solo", Capabilities.from_dict({"kinds": ["sleep"]}))
        f = Fleet(board, {"solo": solo})
        job_id = await f.submit(1, validation={"quorum": 2, "adaptive": False})
        [task] = await f.lease("solo")
        assert (await f.report("solo", task))["status"] == "pending"
        view = await board.job_view(job_id)
        assert view["state"] == "running"
        [why] = view["waiting_because"]
        assert "needs an answer from another agent" in why and "2 agents" in why, why
    finally:
        await board.stop()


def test_a_hub_strangers_can_reach_validates_by_default_and_a_local_one_does_not(tmp_path: Path) -> None:
    assert HubConfig.load(None, env={}, bind="0.0.0.0").validation_quorum == 2
    assert HubConfig.load(None, env={}, bind="127.0.0.1").validation_quorum == 1
    assert HubConfig.load(None, env={}, bind="0.0.0.0", lan=True).validation_quorum == 1
    assert HubConfig.load(None, env={}, bind="0.0.0.0", validation_quorum=3).validation_quorum == 3


async def test_an_agent_whose_result_awaits_a_second_instance_gets_the_next_unit_not_nothing(tmp_path: Path) -> None:
    board = Board(SqliteStore(tmp_path / "board.db"), HubConfig(lease_ttl_s=10, spot_check_share=0.0), FakeClock(T0))
    await board.start()
    try:
        a, b = Identity.generate(), Identity.generate()
        for name, ident in (("a", a), ("b", b)):
            await board.register_agent(ident.public, name, Capabilities.from_dict({"kinds": ["sleep"]}))
        f = Fleet(board, {"a": a, "b": b})
        await f.submit(2, validation={"quorum": 2})       # adaptive: a new agent's unit gets a second instance
        [first] = await f.lease("a")
        assert (await f.report("a", first))["status"] == "pending"
        [nxt] = await f.lease("a")                         # the second instance of unit 0 waits for another agent
        assert nxt.idx == 1, nxt
        [row] = [t for t in await board.tasks_of(first.job_id) if t.id == first.task_id]
        assert row.shown_state == "validating" and row.progress == 1.0
        [other] = await f.lease("b")                       # a second instance of one of a's units
        assert other.idx in (0, 1) and other.task_id not in (first.task_id, nxt.task_id)
    finally:
        await board.stop()


def test_a_loopback_bound_hub_behind_a_proxy_is_treated_as_reachable_by_strangers() -> None:
    """Review finding: a WAN hub behind a reverse proxy (bind 127.0.0.1, host the public name, as the README's
    advice to put a proxy in front leads to) registered strangers without a token, unlimited, and accepted
    each result alone (quorum 1)."""
    proxied = HubConfig.load(None, env={}, bind="127.0.0.1", host="hub.example.org")
    assert proxied.validation_quorum == 2 and proxied.registration_mode == "token"
    local = HubConfig.load(None, env={}, bind="127.0.0.1", host="127.0.0.1")   # `panal up`, the demo
    assert local.validation_quorum == 1 and local.registration_mode == "open"


async def test_a_trusted_agents_unreplicated_unit_is_replicated_again_when_a_new_agent_takes_it_over(
        tmp_path: Path, fleet: Any) -> None:
    """Review finding: replication was decided once, for the first lessee. When a trusted agent's lease
    ended (released, expired, a retry) the next lessee, a brand-new stranger, answered alone and its
    answer became canonical."""
    f = await fleet(validation_quorum=2)
    await f.board.store.record_trust(TrustWrite(reputation=[ReputationRow(f.id("a"), "sleep", 10**9, 10**9, 0)]))
    await f.board.stop()
    f = await fleet(validation_quorum=2)
    job_id = await f.submit(1)
    [ta] = await f.lease("a")
    assert (await f.board.job_view(job_id))["n_tasks"] == 1          # trusted: unreplicated
    await f.board.release(f.id("a"), ta.task_id, ta.lease_id)        # a stops; the task is requeued
    [tb] = await f.lease("b")                                        # b has no record at all
    assert tb.task_id == ta.task_id
    assert (await f.report("b", tb, LIE))["status"] == "pending"     # alone it decides nothing
    assert (await f.board.job_view(job_id))["n_tasks"] == 2          # a second instance was added
    [tc] = await f.lease("c")
    assert (await f.report("c", tc))["status"] == "pending"          # they disagree: a third instance decides
    assert await f.state(tb.task_id) != TaskState.DONE and await f.board.store.get_validations(job_id) == []


async def test_a_spot_check_never_takes_an_agent_past_its_advertised_slots(fleet: Any) -> None:
    """Review finding: a spot check was added to what the agent *asked* for, not what its capacity left:
    an agent with slots: 1 already holding a task got a spot check on top (2 leases held)."""
    from jobs.requirements import Capabilities
    f = await fleet()
    await f.submit(3, validation={"quorum": 2, "adaptive": False})
    [ta] = await f.lease("a")
    tb = (await f.lease("b", slots=3))[-1]
    await f.report("a", ta)
    await f.report("b", tb)                    # unit 0 is validated: a spot-check candidate
    c = f.agents["c"]
    await f.board.register_agent(c.public, "c", Capabilities.from_dict({"kinds": ["sleep"], "slots": 1}))
    assert len(await f.lease("c")) == 1
    f.board.config = f.board.trust.config = HubConfig(spot_check_share=1.0)
    for _ in range(3):
        assert await f.lease("c") == []
    assert len(f.board.view.agents[c.id].running) == 1


async def test_results_nobody_compared_earn_no_credit(fleet: Any) -> None:
    f = await fleet()
    job_id = await f.submit(1, seconds=2.0, validation={"quorum": 2, "adaptive": False, "compare": "none"})
    [ta] = await f.lease("a")
    [tb] = await f.lease("b")
    await f.report("a", ta, {"slept": 2.0})
    await f.report("b", tb, {"slept": 99.0})        # anything "agrees" when nothing is compared
    assert (await f.board.job_view(job_id))["state"] == "succeeded"
    for name in ("a", "b"):
        assert f.board.trust.agent_view(f.id(name))["credit"] == 0.0


async def test_an_owner_comes_from_the_admission_token_never_from_the_agents_own_claim(fleet: Any) -> None:
    f = await fleet(owners={"a": "alice"})
    b = f.agents["b"]
    # b claims to be alice's (to keep her machines off the units it runs): the claim counts for nothing
    await f.board.register_agent(b.public, "b", Capabilities.from_dict({"kinds": ["sleep"], "owner": "alice"}))
    # a re-registers without a token (as known agents do) and keeps the owner its token gave it
    await f.board.register_agent(f.agents["a"].public, "a", Capabilities.from_dict({"kinds": ["sleep"]}))
    assert f.board.view.agents[f.id("a")].row.owner == "alice" and f.board.view.agents[f.id("b")].row.owner is None
    await f.submit(1, replicas=2)
    await f.lease("b")
    assert len(await f.lease("a")) == 1        # alice's machine may still check b's work
    [row] = [r for r in await f.board.store.list_agents() if r.id == f.id("a")]
    assert row.owner == "alice"                # stored: a restart keeps it
