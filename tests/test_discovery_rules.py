"""LAN discovery's rules without a network: which interface addresses are announced (private ones only, or an
allow-list), the TXT record's round trip and its malformed forms, and the peer table's liveness rules. The same
parts between network namespaces over real mDNS are tests/test_discovery.py."""

from __future__ import annotations

import json

import ifaddr
import pytest

from agent.lan.announce import Announcement
from agent.lan.interfaces import InterfacePolicy, select_addresses
from agent.lan.peers import PeerState, PeerTable
from security.errors import BadRequest

FP = "ab" * 32


def _adapter(name: str, *ips: str | tuple[str, int, int]) -> ifaddr.Adapter:
    return ifaddr.Adapter(name, name, [ifaddr.IP(ip, 24, name) for ip in ips], index=1)


ADAPTERS = [
    _adapter("lo", "127.0.0.1", ("::1", 0, 1)),
    _adapter("eth0", "192.168.1.20", "8.8.4.4", ("fe80::1", 0, 2), ("fd00::5", 0, 2), ("2001:4860::1", 0, 2)),
    _adapter("wg0", "10.8.0.2", "100.64.3.4"),
    _adapter("wan", "81.2.69.160"),
]


def test_default_policy_takes_private_addresses_only() -> None:
    chosen = select_addresses(InterfacePolicy(), ADAPTERS)
    assert [(a.interface, a.ip) for a in chosen] == [
        ("eth0", "192.168.1.20"), ("wg0", "10.8.0.2"), ("wg0", "100.64.3.4"),
        ("eth0", "fe80::1"), ("eth0", "fd00::5"),
    ]
    assert next(a for a in chosen if a.ip == "fe80::1").scope_id == 2


def test_allow_list_by_name_and_network() -> None:
    by_name = select_addresses(InterfacePolicy(allow=("eth0",), ipv6=False), ADAPTERS)
    assert [a.ip for a in by_name] == ["192.168.1.20"]
    by_net = select_addresses(InterfacePolicy(allow=("10.8.0.0/24", "lo")), ADAPTERS)
    assert [a.ip for a in by_net] == ["127.0.0.1", "10.8.0.2", "::1"]
    public = select_addresses(InterfacePolicy(allow=("wan",), allow_public=True), ADAPTERS)
    assert [a.ip for a in public] == ["81.2.69.160"]
    assert select_addresses(InterfacePolicy(allow=("wan",)), ADAPTERS) == []


def test_txt_round_trip_and_malformed() -> None:
    ann = Announcement("abc", 7443, FP, ("cpu", "cuda"), 4, True)
    assert ann.txt() == {"id": "abc", "v": "1", "port": "7443", "fp": FP, "caps": "cpu,cuda",
                         "slots": "4", "work": "1"}
    assert Announcement.from_txt(dict(ann.txt())) == ann
    broken_txts: list[dict[str, str | None]] = [
        {"v": "1", "port": "1", "fp": "x"}, {**ann.txt(), "port": "http"}, {**ann.txt(), "fp": None}]
    for broken in broken_txts:
        with pytest.raises(BadRequest):
            Announcement.from_txt(dict(broken))


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_peer_table_liveness_rules() -> None:
    clock, events = _Clock(), []
    table = PeerTable(ttl_s=10, max_failures=2, forget_s=60, clock=clock,
                      listener=lambda ev, p: events.append((str(ev), p.id, str(p.state))))
    ann = Announcement("p1", 1, FP)
    table.observe(ann, ["10.0.0.1"])
    table.observe(ann, ["10.0.0.1"])  # a refresh with nothing new is not a change
    clock.now += 9
    assert table.expire() == []
    table.touch("p1")
    clock.now += 9
    assert table.expire() == [] and table.peers()[0].state is PeerState.ALIVE
    clock.now += 1.5
    assert [p.id for p in table.expire()] == ["p1"] and table.peers() == []
    table.touch("p1")  # re-announced: back
    table.mark_failed("p1")
    table.mark_alive("p1")
    table.mark_failed("p1")
    table.mark_failed("p1")
    dropped = table.get("p1")
    assert dropped is not None and dropped.state is PeerState.GONE
    again = table.mark_failed("p1")  # already gone: no second removal
    assert again is not None and again.failures == 2
    table.mark_alive("p1")
    table.observe(Announcement("p1", 1, FP, slots=3), ["10.0.0.1"])
    table.goodbye("p1")
    table.goodbye("p1")
    assert table.mark_alive("p1") is None and table.mark_failed("nobody") is None
    assert events == [
        ("added", "p1", "alive"), ("removed", "p1", "gone"), ("added", "p1", "alive"),
        ("updated", "p1", "suspect"), ("updated", "p1", "alive"), ("updated", "p1", "suspect"),
        ("removed", "p1", "gone"), ("added", "p1", "alive"), ("updated", "p1", "alive"),
        ("removed", "p1", "gone"),
    ]
    table.observe(ann, ["10.0.0.9"])
    table.mark_failed("p1")
    table.mark_failed("p1")
    clock.now += 61
    table.expire()
    assert table.get("p1") is None  # forgotten
    assert json.loads(table.to_json()) == []

