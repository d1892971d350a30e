"""The table of discovered LAN peers and their liveness (pure: no I/O, a clock to inject).

mDNS alone cannot tell that a peer died: a SIGKILLed peer sends no goodbye and zeroconf keeps its
PTR record for many minutes. So :class:`PeerTable` adds its own liveness: a peer is dropped after
``max_failures`` consecutive failed contacts (:meth:`PeerTable.mark_failed`, from the daemon) or
``ttl_s`` seconds with neither a successful contact (:meth:`PeerTable.mark_alive`) nor a
re-announcement; announcers re-send their records every ``refresh_s`` (< ``ttl_s``) for that.
A dropped peer is kept as ``gone`` for a while and comes back when it re-announces or answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.lan.announce import Announcement

__all__ = ["Listener", "Peer", "PeerCallback", "PeerEvent", "PeerState", "PeerTable"]

log = logging.getLogger(__name__)


class PeerState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # at least one failed contact since the last sign of life
    GONE = "gone"  # dropped: too many failures or silent past the TTL; hidden from peers()


class PeerEvent(StrEnum):
    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


@dataclass(frozen=True)
class Peer:
    id: str
    addresses: tuple[str, ...]
    port: int
    fingerprint: str
    caps: tuple[str, ...]
    slots: int
    work: bool
    version: str
    last_seen: float  # wall clock (epoch seconds) of the last announcement or successful contact
    state: PeerState = PeerState.ALIVE
    failures: int = 0
    instance: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(addresses=list(self.addresses), caps=list(self.caps), state=str(self.state))
        return data


PeerCallback = Callable[[PeerEvent, Peer], Awaitable[None]]
Listener = Callable[[PeerEvent, Peer], None]


@dataclass
class PeerTable:
    """Discovered peers and their liveness. Not thread-safe: use from the event loop only."""

    ttl_s: float = 10.0
    max_failures: int = 3
    forget_s: float = 3600.0  # how long a gone peer is remembered so it can come back
    listener: Listener | None = None
    clock: Callable[[], float] = time.monotonic
    _peers: dict[str, Peer] = field(default_factory=dict, repr=False)
    _seen: dict[str, float] = field(default_factory=dict, repr=False)  # monotonic last sign of life

    def peers(self, *, include_gone: bool = False) -> list[Peer]:
        return sorted(
            (p for p in self._peers.values() if include_gone or p.state is not PeerState.GONE),
            key=lambda p: p.id,
        )

    def get(self, peer_id: str) -> Peer | None:
        return self._peers.get(peer_id)

    def to_json(self) -> str:
        return json.dumps([p.to_dict() for p in self.peers()], indent=2)

    def observe(self, ann: Announcement, addresses: Sequence[str], instance: str = "") -> Peer:
        """Record a resolved announcement: adds, updates or revives the peer."""
        old = self._peers.get(ann.agent_id)
        peer = Peer(ann.agent_id, tuple(addresses), ann.port, ann.fingerprint, ann.caps, ann.slots,
                    ann.work, ann.version, time.time(), PeerState.ALIVE, 0, instance)
        if old is None or old.state is PeerState.GONE:
            event: PeerEvent | None = PeerEvent.ADDED
        elif dataclasses.replace(old, last_seen=peer.last_seen) != peer:
            event = PeerEvent.UPDATED
        else:
            event = None
        self._set(peer, event)
        return peer

    def touch(self, peer_id: str) -> Peer | None:
        """A sign of life from mDNS (re-announcement or answer): same as a successful contact."""
        return self.mark_alive(peer_id)

    def mark_alive(self, peer_id: str) -> Peer | None:
        """A successful contact: clears failures; revives a gone peer. Unknown ids are ignored."""
        old = self._peers.get(peer_id)
        if old is None:
            return None
        peer = dataclasses.replace(old, last_seen=time.time(), state=PeerState.ALIVE, failures=0)
        event = {PeerState.GONE: PeerEvent.ADDED, PeerState.SUSPECT: PeerEvent.UPDATED}.get(old.state)
        self._set(peer, event)
        return peer

    def mark_failed(self, peer_id: str) -> Peer | None:
        """A failed contact; the ``max_failures``-th in a row drops the peer. Unknown ids are ignored."""
        old = self._peers.get(peer_id)
        if old is None or old.state is PeerState.GONE:
            return old
        failures = old.failures + 1
        state = PeerState.GONE if failures >= self.max_failures else PeerState.SUSPECT
        peer = dataclasses.replace(old, state=state, failures=failures)
        self._peers[peer_id] = peer
        self._emit(PeerEvent.REMOVED if state is PeerState.GONE else PeerEvent.UPDATED, peer)
        return peer

    def goodbye(self, peer_id: str) -> Peer | None:
        """The peer left cleanly: forget it at once."""
        old = self._peers.pop(peer_id, None)
        self._seen.pop(peer_id, None)
        if old is not None and old.state is not PeerState.GONE:
            self._emit(PeerEvent.REMOVED, dataclasses.replace(old, state=PeerState.GONE))
        return old

    def expire(self) -> list[Peer]:
        """Drop peers silent for ``ttl_s``; forget gone ones after ``forget_s``. Returns the dropped."""
        now, dropped = self.clock(), []
        for peer_id, seen in list(self._seen.items()):
            peer = self._peers[peer_id]
            if peer.state is not PeerState.GONE and now - seen > self.ttl_s:
                peer = dataclasses.replace(peer, state=PeerState.GONE)
                self._peers[peer_id] = peer
                dropped.append(peer)
                self._emit(PeerEvent.REMOVED, peer)
            elif peer.state is PeerState.GONE and now - seen > self.forget_s:
                del self._peers[peer_id], self._seen[peer_id]
        return dropped

    def _set(self, peer: Peer, event: PeerEvent | None) -> None:
        self._peers[peer.id] = peer
        self._seen[peer.id] = self.clock()
        if event is not None:
            self._emit(event, peer)

    def _emit(self, event: PeerEvent, peer: Peer) -> None:
        log.debug("peer %s %s (%s)", peer.id, event, peer.state)
        if self.listener is not None:
            self.listener(event, peer)
