"""LAN discovery: real mDNS between processes in separate network namespaces.

Each "agent" is this file run as a program (``node`` below) on a lab host: it announces and/or
browses, prints its peer-table events as JSON lines and obeys commands on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zeroconf._engine
from system_needs import require_system
from zeroconf import RecordUpdate, RecordUpdateListener, Zeroconf
from zeroconf.const import _CLASS_IN, _TYPE_TXT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the node runs as a plain script

import netns
from netns import NetnsLab

from agent.lan.announce import SERVICE_TYPE, Announcement, LanAnnouncer
from agent.lan.browse import LanBrowser
from agent.lan.interfaces import InterfacePolicy, open_zeroconf, select_addresses
from agent.lan.peers import Peer, PeerEvent, PeerTable

ROOT = Path(__file__).resolve().parents[1]
netns_lab, lan_lab = netns.netns_lab, netns.lan_lab  # the lab fixtures, for this module
FP = "ab" * 32


# ------------------------------------------------------------------ the node program


def _emit(ev: str, **data: Any) -> None:
    print(json.dumps({"ev": ev, "t": time.time(), **data}), flush=True)


class _Purges(RecordUpdateListener):
    """Reports the panal records zeroconf hands its listeners already expired (purged from the cache)."""

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            if update.new.is_expired(now) and update.new.name.lower().endswith(SERVICE_TYPE):
                _emit("purged", name=update.new.name.lower(), type=update.new.type)


async def _node(args: argparse.Namespace) -> None:
    emit = _emit
    if args.manual_cache_cleanup:  # zeroconf's 10 s cache cleanup runs only on the "cleanup" command
        zeroconf._engine._CACHE_CLEANUP_INTERVAL = 3600
    policy = InterfacePolicy(allow=tuple(args.allow), allow_public=args.allow_public, ipv6=False)
    addresses = select_addresses(policy)
    zc = open_zeroconf(addresses)
    zc.zeroconf.async_add_listener(_Purges(), None)
    announcer = None
    if args.announce:
        ann = Announcement(args.id, args.port, FP, tuple(args.caps.split(",")), args.slots, args.work)
        announcer = LanAnnouncer(zc, ann, addresses, refresh_s=args.refresh)
        await announcer.start()

    async def on_change(event: PeerEvent, peer: Peer) -> None:
        emit(str(event), peer=peer.to_dict())

    table = PeerTable(ttl_s=args.ttl, max_failures=args.max_failures)
    browser = LanBrowser(zc, self_id=args.id, table=table, on_change=on_change) if args.browse else None
    if browser is not None:
        await browser.start()
    emit("ready", announced=announcer.addresses if announcer else [])

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        cmd, rest = line[0], line[1:]
        if cmd == "update" and announcer is not None:
            await announcer.update(slots=int(rest[0]), work=rest[1] == "1")
        elif cmd == "fail" and browser is not None:
            browser.mark_failed(rest[0])
        elif cmd == "table" and browser is not None:
            emit("table", peers=json.loads(table.to_json()))
        elif cmd == "txt":  # the TTLs of the TXT records cached for instance rest[0]
            emit("txt", ttls=[r.ttl for r in zc.zeroconf.cache.async_all_by_details(rest[0], _TYPE_TXT, _CLASS_IN)])
        elif cmd == "cleanup":
            zc.zeroconf.engine._async_cache_cleanup()
        elif cmd == "close":
            break
        emit("done", cmd=cmd)
    if browser is not None:
        await browser.close()
    if announcer is not None:
        await announcer.close()
    await zc.async_close()
    emit("closed")


def _node_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--id", required=True)
    p.add_argument("--port", type=int, default=7443)
    p.add_argument("--caps", default="cpu")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--work", action="store_true")
    p.add_argument("--ttl", type=float, default=10.0)
    p.add_argument("--refresh", type=float, default=3.0)
    p.add_argument("--max-failures", type=int, default=3)
    p.add_argument("--allow", action="append", default=[])
    p.add_argument("--allow-public", action="store_true")
    p.add_argument("--no-announce", dest="announce", action="store_false")
    p.add_argument("--no-browse", dest="browse", action="store_false")
    p.add_argument("--manual-cache-cleanup", action="store_true")
    asyncio.run(_node(p.parse_args()))


# ------------------------------------------------------------------ driving nodes from a test


class Node:
    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc, self.name = proc, name
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, lab: Any, host: int, node_id: str, *args: str) -> Node:
        argv = lab.argv(host, [sys.executable, __file__, "--id", node_id, *args])
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        node = cls(proc, node_id)
        await node.wait(lambda e: e["ev"] == "ready", 10)
        return node

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))
            self._changed.set()
        self._changed.set()

    async def wait(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
        """The first event (past or future) matching ``pred``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events:
                if pred(event):
                    return event
            if self.proc.returncode is not None and self._reader.done():
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}); events: {self.events}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no matching event in {timeout_s}s; events: {self.events}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def peer_event(self, kind: str, peer_id: str, timeout_s: float, after: float = 0) -> dict[str, Any]:
        event = await self.wait(
            lambda e: e["ev"] == kind and e["peer"]["id"] == peer_id and e["t"] >= after, timeout_s
        )
        return event

    def saw(self, kind: str, peer_id: str, after: float = 0) -> bool:
        return any(e["ev"] == kind and e.get("peer", {}).get("id") == peer_id and e["t"] >= after
                   for e in self.events)

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def ask(self, command: str, answer: str) -> dict[str, Any]:
        """Send ``command`` and return the first ``answer`` event after it."""
        before = len(self.events)
        await self.send(command)
        return await self.wait(lambda e: e["ev"] == answer and self.events.index(e) >= before, 5)

    async def table(self) -> list[dict[str, Any]]:
        peers: list[dict[str, Any]] = (await self.ask("table", "table"))["peers"]
        return peers

    async def until(self, probe: Callable[[], Awaitable[bool]], what: str, timeout_s: float) -> None:
        """Ask ``probe`` (which queries this node) until it holds."""
        deadline = time.monotonic() + timeout_s
        while not await probe():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {what} not within {timeout_s}s; events: {self.events}")
            await asyncio.sleep(0.1)  # the polling period, not a wait for something to happen

    async def close(self) -> float:
        """Graceful stop; returns when it was asked to."""
        asked = time.time()
        await self.send("close")
        await self.wait(lambda e: e["ev"] == "closed", 10)
        await self.proc.wait()
        return asked

    async def kill(self) -> float:
        killed = time.time()
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        return killed


@pytest.fixture
async def nodes() -> Any:
    started: list[Node] = []
    yield started
    for node in started:
        if node.proc.returncode is None:
            node.proc.kill()
            await node.proc.wait()
        node._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await node._reader
        if node.proc.stdin is not None:
            node.proc.stdin.close()


async def _start(nodes: list[Node], lab: Any, host: int, node_id: str, *args: str) -> Node:
    node = await Node.start(lab, host, node_id, *args)
    nodes.append(node)
    return node


# ------------------------------------------------------------------ the lab tests


async def test_announcers_and_browser_discover_each_other_with_txt(
    lan_lab: NetnsLab, nodes: list[Node]
) -> None:
    lab = lan_lab
    t0 = time.time()
    a = await _start(nodes, lab, 1, "agenta", "--port", "7001", "--caps", "cpu,cuda", "--slots", "3")
    b = await _start(nodes, lab, 2, "agentb", "--port", "7002", "--work")
    c = await _start(nodes, lab, 3, "watcher", "--no-announce")

    seen_a = (await c.peer_event("added", "agenta", 5))["peer"]
    seen_b = (await c.peer_event("added", "agentb", 5))["peer"]
    await a.peer_event("added", "agentb", 5)
    await b.peer_event("added", "agenta", 5)
    assert not c.saw("added", "watcher") and not a.saw("added", "agenta")  # no self, no ghost
    assert seen_a["addresses"] == [lab.addr(1)] and seen_b["addresses"] == [lab.addr(2)]
    assert (seen_a["port"], seen_a["fingerprint"], seen_a["caps"], seen_a["slots"], seen_a["work"]) == (
        7001, FP, ["cpu", "cuda"], 3, False)
    assert (seen_b["port"], seen_b["caps"], seen_b["slots"], seen_b["work"]) == (7002, ["cpu"], 2, True)
    assert seen_a["version"] == "1" and seen_a["state"] == "alive"
    took = max(seen_a["last_seen"], seen_b["last_seen"]) - t0
    print(f"discovery of 2 peers: {took:.2f}s after the first start")

    changed = time.time()
    await a.send("update 0 1")
    updated = (await c.peer_event("updated", "agenta", 5, after=changed))["peer"]
    assert (updated["slots"], updated["work"]) == (0, True)
    assert {p["id"] for p in await c.table()} == {"agenta", "agentb"}


async def test_clean_close_removes_peer_at_once(lan_lab: NetnsLab, nodes: list[Node]) -> None:
    lab = lan_lab
    a = await _start(nodes, lab, 1, "agenta", "--ttl", "30")
    b = await _start(nodes, lab, 2, "agentb", "--ttl", "30")
    c = await _start(nodes, lab, 3, "watcher", "--no-announce", "--ttl", "30")
    for peer in ("agenta", "agentb"):
        await c.peer_event("added", peer, 5)
    asked = await a.close()
    removed = await c.peer_event("removed", "agenta", 3)
    took = removed["t"] - asked
    print(f"removal after goodbye: {took:.2f}s")
    assert took < 1.5  # far below any TTL: the goodbye did it
    assert [p["id"] for p in await c.table()] == ["agentb"]
    assert not c.saw("removed", "agentb") and not b.saw("removed", "agentb")


async def _alive_since(node: Node, peer_id: str, since: float) -> bool:
    """Whether ``node`` holds ``peer_id`` alive with a sign of life newer than ``since``."""
    return any(p["id"] == peer_id and p["state"] == "alive" and p["last_seen"] > since for p in await node.table())


async def test_sigkilled_peer_leaves_while_live_peer_stays_and_returns_on_reannounce(
    lan_lab: NetnsLab, nodes: list[Node]
) -> None:
    lab = lan_lab
    ttl, refresh = 2.5, 0.6
    fast = ("--ttl", str(ttl), "--refresh", str(refresh))
    await _start(nodes, lab, 1, "agenta", *fast)
    b = await _start(nodes, lab, 2, "agentb", *fast)
    c = await _start(nodes, lab, 3, "watcher", "--no-announce", *fast)
    for peer in ("agenta", "agentb"):
        await c.peer_event("added", peer, 5)

    killed = await b.kill()
    removed = await c.peer_event("removed", "agentb", 30)
    print(f"removal after SIGKILL (ttl {ttl}s, refresh {refresh}s): {removed['t'] - killed:.2f}s")
    assert removed["peer"]["state"] == "gone"
    # the live peer, refreshed by its heartbeats, is still there a whole TTL after the kill
    await c.until(lambda: _alive_since(c, "agenta", killed + ttl), "a heartbeat of agenta a TTL after the kill", 30)
    assert not c.saw("removed", "agenta")
    assert [p["id"] for p in await c.table()] == ["agenta"]

    # the same agent restarts: zeroconf still caches its PTR, yet the re-announcement revives it
    restarted = time.time()
    await _start(nodes, lab, 2, "agentb", *fast)
    back = await c.peer_event("added", "agentb", 5, after=restarted)
    print(f"return after restart: {back['t'] - restarted:.2f}s")


async def test_killed_peer_stays_gone_when_its_stale_records_expire(lan_lab: NetnsLab, nodes: list[Node]) -> None:
    """A peer that changed its TXT shortly before dying leaves an old TXT in the cache, marked to
    expire; zeroconf's cache cleanup reports it to listeners after the peer is gone. It is no sign
    of life: the peer must stay gone (it used to be revived, or kept ~10 s longer)."""
    lab = lan_lab
    ttl, refresh = 2.5, 0.6
    fast = ("--ttl", str(ttl), "--refresh", str(refresh))
    await _start(nodes, lab, 1, "agenta", *fast)
    b = await _start(nodes, lab, 2, "agentb", *fast)
    c = await _start(nodes, lab, 3, "watcher", "--no-announce", "--manual-cache-cleanup", *fast)
    for peer in ("agenta", "agentb"):
        await c.peer_event("added", peer, 5)
    changed = time.time()
    await b.send("update 0 1")
    await c.peer_event("updated", "agentb", 5, after=changed)
    instance = f"panal-agentb.{SERVICE_TYPE}"

    async def old_txt_marked() -> bool:  # b's next heartbeats mark its previous TXT to expire in 1 s
        return 1 in (await c.ask(f"txt {instance}", "txt"))["ttls"]

    await c.until(old_txt_marked, "the old TXT marked to expire", 10)
    killed = await b.kill()
    removed = await c.peer_event("removed", "agentb", 30)
    print(f"removal after SIGKILL (ttl {ttl}s, refresh {refresh}s): {removed['t'] - killed:.2f}s")
    await c.send("cleanup")
    purged = await c.wait(lambda e: e["ev"] == "purged" and e["name"] == instance and e["type"] == _TYPE_TXT, 5)
    assert purged["t"] > removed["t"]  # the stale record reached the listeners after b had left
    assert [p["id"] for p in await c.table()] == ["agenta"]
    assert not c.saw("added", "agentb", after=removed["t"]) and not c.saw("removed", "agenta")


async def test_failed_contacts_drop_peer_until_it_reannounces(lan_lab: NetnsLab, nodes: list[Node]) -> None:
    lab = lan_lab
    await _start(nodes, lab, 1, "agenta", "--refresh", "1.5", "--max-failures", "3")
    c = await _start(nodes, lab, 3, "watcher", "--no-announce", "--max-failures", "3")
    await c.peer_event("added", "agenta", 5)
    start = time.time()
    for _ in range(2):
        await c.send("fail agenta")
    suspect = await c.wait(lambda e: e["ev"] == "updated" and e["peer"]["failures"] == 2, 3)
    assert suspect["peer"]["state"] == "suspect"
    await c.send("fail agenta")
    gone = await c.peer_event("removed", "agenta", 3, after=start)
    assert gone["peer"]["state"] == "gone"
    assert await c.table() == [] or not c.saw("added", "agenta", after=gone["t"])
    back = await c.peer_event("added", "agenta", 4, after=gone["t"])  # its next heartbeat
    assert back["peer"]["failures"] == 0 and back["peer"]["state"] == "alive"


_AVAHI = shutil.which("avahi-browse") and shutil.which("avahi-daemon") and shutil.which("dbus-daemon")

# A private D-Bus system bus and avahi-daemon inside the host's own mount namespace (ip netns exec
# gives each command one), so nothing touches the machine's real /run.
_AVAHI_SCRIPT = """
set -e
mount -t tmpfs none /run/dbus 2>/dev/null || { mkdir -p /run/dbus; mount -t tmpfs none /run/dbus; }
mkdir -p /run/avahi-daemon && mount -t tmpfs none /run/avahi-daemon
dbus-daemon --system --fork --nopidfile
avahi-daemon --daemonize --no-drop-root --no-chroot --no-rlimits
for i in $(seq 1 40); do avahi-daemon --check && break; sleep 0.25; done
for i in $(seq 1 20); do
  out=$(avahi-browse --resolve --parsable --terminate --no-db-lookup _panal._tcp || true)
  echo "$out" | grep -q '^=' && { echo "$out"; break; }
  sleep 0.5
done
avahi-daemon --kill || true
"""


async def test_standard_avahi_browser_resolves_the_service(lan_lab: NetnsLab, nodes: list[Node]) -> None:
    lab = lan_lab
    require_system(None if _AVAHI else "Avahi and D-Bus (Debian packages avahi-daemon avahi-utils dbus)")
    await _start(nodes, lab, 1, "agenta", "--port", "7001", "--caps", "cpu,rocm", "--slots", "5")
    proc = await asyncio.create_subprocess_exec(
        *lab.argv(4, ["sh", "-c", _AVAHI_SCRIPT]), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 40)
    resolved = [line.split(";") for line in out.decode().splitlines() if line.startswith("=;")]
    assert resolved, out.decode()
    _, iface, proto, name, stype, domain, host, address, port, txt = resolved[0][:10]
    assert (iface, proto, name, stype, domain) == ("eth0", "IPv4", "panal-agenta", "_panal._tcp", "local")
    assert (host, address, port) == ("panal-agenta.local", lab.addr(1), "7001")
    assert {f'"{kv}"' for kv in ("id=agenta", "v=1", "port=7001", f"fp={FP}", "caps=cpu,rocm",
                                 "slots=5", "work=0")} == set(txt.split(" "))


async def test_public_addresses_are_never_announced(lan_lab: NetnsLab, nodes: list[Node]) -> None:
    lab = lan_lab
    public = "45.79.0.10"
    lab.sh(4, f"ip addr add {public}/24 dev eth0")
    try:
        watcher = await _start(nodes, lab, 3, "watcher", "--no-announce")
        private = await _start(nodes, lab, 4, "agentd")
        open_ = await _start(nodes, lab, 4, "agente", "--allow-public")
        assert private.events[0]["announced"] == [lab.addr(4)]
        assert set(open_.events[0]["announced"]) == {lab.addr(4), public}  # the check can see it
        seen_d = (await watcher.peer_event("added", "agentd", 5))["peer"]
        seen_e = (await watcher.peer_event("added", "agente", 5))["peer"]
        assert seen_d["addresses"] == [lab.addr(4)]
        assert public in seen_e["addresses"]
        # an allow list naming only the interface still never yields the public address
        named = await _start(nodes, lab, 4, "agentf", "--allow", "eth0")
        assert named.events[0]["announced"] == [lab.addr(4)]
    finally:
        lab.sh(4, f"ip addr del {public}/24 dev eth0", check=False)


if __name__ == "__main__":
    _node_main()
