"""LAN mode: every agent carries a board, announces it over mDNS and pulls from its peers' boards.

:class:`LanMode` plugs into the daemon (``daemon.on_start``): it serves an embedded board
(``HOME/lan/``: self-signed TLS, its own SQLite) on the allowed interfaces, announces
``_panal._tcp.local.`` with that board's port and certificate fingerprint, and adds every
discovered peer's board to the daemon, pinned to the fingerprint from the peer's TXT record.

Trust: a board accepts submissions only from this agent's user key and the keys in its trust
store (``HOME/trust.yaml``, re-read while running). The daemon runs a task from any LAN board
(its own or a peer's) only if the task's submitter is this agent's own user or in its trust
store; other tasks are handed back. So an untrusted submitter's job, submitted to a board that
accepts it (the submitter's own agent, or one that trusts it), is run only by agents that trust
that submitter, and stays queued if none does. ``lan.open`` turns the run-time check off
(classrooms): the agent then runs whatever its own and its peers' boards hand it; what each board
accepts is still decided by that board's owner and trust store.

Polling: the TXT record says whether a board has queued work; boards without any (peers' and our
own) are polled at most every ``idle_poll_s`` (each link's ``hold_off`` hook), boards with work at
once. This keeps idle LAN traffic low and keeps idle boards from holding this agent's free slots in
long polls.

Liveness: mDNS cannot tell that a peer died, so the peer table also hears from the daemon's link
to the peer's board (its ``on_health`` hook): a failed call marks the peer failed, an answered one
marks it alive. A peer that is dropped has its board removed from the daemon.

LAN mode plugs into the daemon through its public hooks only (``on_start``, ``status_extras``,
``add_board(..., trusted=, on_health=, hold_off=)``, ``remove_board``) and into its board through
:class:`~hub.server.BoardServer`'s methods.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import yaml

from agent.daemon import Daemon
from agent.daemon.board_link import BoardLink
from agent.daemon.hooks import CodeConsent, HealthListener, HoldOff, SubmitterCheck
from agent.host.home import AgentHome
from agent.lan.announce import Announcement, LanAnnouncer
from agent.lan.browse import LanBrowser
from agent.lan.interfaces import InterfacePolicy, LocalAddress, open_zeroconf, select_addresses
from agent.lan.peers import Peer, PeerEvent, PeerTable
from agent.lan.settings import LanSettings
from hub.background import cancel_all, run_every
from hub.home import HubHome
from hub.server import BoardServer
from security.errors import BadRequest, PanalError
from security.identity import PublicKey
from security.tls import BoardAddress, server_context
from security.truststore import TrustStore

__all__ = ["LanMode"]

log = logging.getLogger(__name__)
#: defaults written into a new ``HOME/lan/hub.yaml``: peers long-poll each board in turn, so keep polls short
_BOARD_DEFAULTS: dict[str, Any] = {"max_poll_wait_s": 5.0, "lease_ttl_s": 20.0}


@dataclass
class _PeerLink:
    url: str
    link: BoardLink
    trusted: bool | None = None   # None until the peer's board offers us a task


class LanMode:
    """The LAN side of one agent. ``start`` is a daemon ``on_start`` hook; ``stop`` after the daemon."""

    def __init__(self, home: AgentHome, settings: LanSettings) -> None:
        self.home = home
        self.settings = settings
        self.hub_home = HubHome(home.root / "lan")
        self.trust = TrustStore(home.root / "trust.yaml")
        self.url_path = home.root / "lan-board.url"
        self.address: BoardAddress | None = None
        self.table = PeerTable(ttl_s=settings.ttl_s, max_failures=settings.max_failures)
        self._daemon: Daemon | None = None
        self._server: BoardServer | None = None
        self._announcer: LanAnnouncer | None = None
        self._browser: LanBrowser | None = None
        self._zc: Any = None
        self._addresses: list[LocalAddress] = []
        self._owner = ""
        self._trusted_keys: dict[str, PublicKey] = {}
        self._code_keys: frozenset[str] = frozenset()   # trusted for their code too (`trust add --code`)
        self._code = CodeConsent(keys=lambda: self._code_keys)
        self._trust_stamp: tuple[int, int] | None = None
        self._peers: dict[str, _PeerLink] = {}
        self._queued = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self, daemon: Daemon) -> None:
        self._daemon = daemon
        s = self.settings
        if s.open:
            log.warning("LAN OPEN MODE (lan.open: true): this agent runs LAN work from ANY submitter whose job "
                        "a board on this network accepted; the trust store is NOT checked")
        policy = InterfacePolicy(allow=s.interfaces, allow_public=s.allow_public, ipv6=s.ipv6)
        self._addresses = await asyncio.to_thread(select_addresses, policy)
        if not self._addresses:
            why = "no network interface is allowed for LAN mode (check lan.interfaces, or run with --no-lan)"
            if daemon.boards:  # the agent has joined boards: it can work without LAN mode
                log.warning("%s; running without LAN mode", why)
                return
            raise BadRequest(why)
        user = await asyncio.to_thread(self.home.user_identity)
        self._owner = user.id
        await self._start_board(user.public)
        address = self.address
        assert address is not None and self._server is not None
        await asyncio.to_thread(self.url_path.write_text, address.join_url() + "\n")
        daemon.add_board(address, trusted=None if s.open else self._trusts, hold_off=self._own_hold_off,
                         code=self._code)
        daemon.status_extras.append(self.status)

        self._zc = open_zeroconf(self._addresses)
        announcement = Announcement(daemon.identity.id, self._server.port, address.fingerprint or "",
                                    _caps_summary(daemon.capabilities), daemon.settings.slots, False)
        self._announcer = LanAnnouncer(self._zc, announcement, self._addresses, refresh_s=s.refresh_s)
        await self._announcer.start()
        self._browser = LanBrowser(self._zc, self_id=daemon.identity.id, table=self.table,
                                   on_change=self._on_peer, sweep_s=min(1.0, s.ttl_s / 4))
        await self._browser.start()
        self._tasks = [run_every(s.sync_s, self._sync, "LAN sync")]
        log.info("LAN mode: board %s announced on %s", address.join_url(),
                 ", ".join(a.ip for a in self._addresses))

    async def stop(self) -> None:
        """Stop leasing, let peers finish what they hold (bounded), say goodbye, stop the board."""
        self._stopping = True
        await cancel_all(self._tasks)
        if self._server is not None:
            await self._server.drain()
        self.url_path.unlink(missing_ok=True)
        if self._browser is not None:
            await self._browser.close()
        if self._announcer is not None:
            await self._announcer.close()  # the goodbye: peers drop us at once
        if self._zc is not None:
            await self._zc.async_close()
        if self._server is not None:
            await self._server.stop(drain=False)  # its runner stops the extra sites too
        self._server = None

    async def _start_board(self, owner: PublicKey) -> None:
        s, hub = self.settings, self.hub_home
        host = self._addresses[0].ip
        if not hub.config_path.exists():
            hub.root.mkdir(parents=True, exist_ok=True)
            hub.config_path.write_text("# the board embedded in this agent (LAN mode); every HubConfig key "
                                       "may be set here, env PANAL_HUB_* overrides\n"
                                       + yaml.safe_dump({"host": host, "port": s.port, "tls": True,
                                                         **_BOARD_DEFAULTS}, sort_keys=False))
        await asyncio.to_thread(hub.init, host, s.port, None, False)   # no hostname in the certificate
        bind = s.bind or host
        config = hub.config(host=host, bind=bind, port=s.port, tls=True, lan=True)
        context = server_context(hub.cert_path, hub.tls_key_path)
        server = BoardServer(config, hub.db_path, context)
        port = await server.start()
        self._server = server
        if not s.bind:  # the board's own site serves the first address; add the others
            for extra in {a.ip for a in self._addresses[1:]} - {host}:
                await server.listen_also(extra)
        self.address = hub.address(config, port)
        await server.add_submitter(owner, "owner")
        await self._sync_trust()

    # -- trust --------------------------------------------------------------------------------
    def _trusts(self, submitter_id: str) -> bool:
        return self.settings.open or submitter_id == self._owner or submitter_id in self._trusted_keys

    async def _sync_trust(self) -> None:
        """Re-read the trust store when it changed; make the board's submitters match it."""
        try:
            stat = await asyncio.to_thread(os.stat, self.trust.path)
            stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._trust_stamp and self._trust_stamp is not None:
            return
        try:
            keys = await asyncio.to_thread(self.trust.list)
        except PanalError as exc:
            log.warning("trust store unreadable, keeping the previous keys: %s", exc.message)
            return
        self._trust_stamp = stamp
        wanted = {k.id: k.public_key() for k in keys}
        code = frozenset(k.id for k in keys if k.code)
        if code != self._code_keys:
            self._code_keys = code
            log.info("LAN trust store: code accepted from %d key(s)", len(code))
            if self._daemon is not None:
                self._daemon.readvertise()
        if wanted.keys() != self._trusted_keys.keys():
            log.info("LAN trust store: %d trusted submitter key(s)", len(wanted))
        server = self._server
        assert server is not None
        for key_id, key in wanted.items():
            if key_id not in self._trusted_keys:
                await server.add_submitter(key, next(k.name or "trusted" for k in keys if k.id == key_id))
        # from the board's own list: a key removed while the agent was down is dropped too
        await server.remove_submitters(await server.submitter_ids() - set(wanted) - {self._owner})
        self._trusted_keys = wanted

    async def _sync(self) -> None:
        """Re-read the trust store; re-announce free slots and whether this board has queued work."""
        assert self._daemon is not None and self._announcer is not None and self._server is not None
        await self._sync_trust()
        self._queued = int(self._server.board.status()["tasks"].get("queued", 0))
        await self._announcer.update(slots=max(0, self._daemon.settings.slots - self._daemon.tasks_running),
                                     work=self._queued > 0)

    # -- peers --------------------------------------------------------------------------------
    async def _on_peer(self, event: PeerEvent, peer: Peer) -> None:
        if self._stopping or self._daemon is None or self._daemon.stopping:
            return
        current = self._peers.get(peer.id)
        if event is PeerEvent.REMOVED:
            if current is not None:
                del self._peers[peer.id]
                log.info("LAN peer %s left: no longer pulling from %s", peer.id, current.url)
                await self._daemon.remove_board(current.url)
            return
        address = _peer_address(peer)
        if address is None:
            log.info("LAN peer %s has no usable address: %s", peer.id, peer.addresses)
            return
        if current is not None:
            if current.url == address.url and current.link.address.fingerprint == address.fingerprint:
                return
            await self._daemon.remove_board(current.url)  # restarted elsewhere, or a new certificate
        link = self._daemon.add_board(address, trusted=None if self.settings.open else self._peer_check(peer.id),
                                      retry_for_s=self.settings.peer_retry_for_s,
                                      on_health=self._peer_health(peer.id, address.url),
                                      hold_off=self._peer_hold_off(peer.id), code=self._code)
        self._peers[peer.id] = _PeerLink(address.url, link, trusted=True if self.settings.open else None)
        log.info("LAN peer %s joined: pulling from %s", peer.id, address.url)

    def _peer_check(self, peer_id: str) -> SubmitterCheck:
        def check(submitter_id: str) -> bool:
            ok = self._trusts(submitter_id)
            entry = self._peers.get(peer_id)
            if entry is not None:
                entry.trusted = ok
            return ok
        return check

    def _peer_health(self, peer_id: str, url: str) -> HealthListener:
        """Feed the peer table what the daemon's link to the peer's board learns, call by call."""
        def heard(answered: bool) -> None:
            entry = self._peers.get(peer_id)
            if entry is None or entry.url != url:
                return  # a link to a board we no longer pull from
            if answered:
                self.table.mark_alive(peer_id)
            else:
                self.table.mark_failed(peer_id)
        return heard

    # -- pacing: boards without queued work are polled every idle_poll_s ----------------------
    def _own_hold_off(self) -> float:
        return self.settings.idle_poll_s if self._queued == 0 else 0.0

    def _peer_hold_off(self, peer_id: str) -> HoldOff:
        def hold_off() -> float:
            peer = self.table.get(peer_id)
            return self.settings.idle_poll_s if peer is not None and not peer.work else 0.0
        return hold_off

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``{"peers": [...], "lan": {...}}`` for the control socket (``panal peers``)."""
        peers = []
        for peer in self.table.peers():
            entry = self._peers.get(peer.id)
            peers.append({**peer.to_dict(), "url": entry.url if entry else None,
                          "breaker": entry.link.breaker_state.value if entry else None,
                          "trusted": entry.trusted if entry else None})
        announcement = self._announcer.announcement if self._announcer else None
        return {"peers": peers, "lan": {
            "board": self.address.join_url() if self.address else None,
            "addresses": [a.ip for a in self._addresses], "open": self.settings.open,
            "ttl_s": self.settings.ttl_s, "trusted_submitters": sorted(self._trusted_keys),
            "announcement": announcement.txt() if announcement else None,
        }}


def _caps_summary(capabilities: dict[str, Any]) -> tuple[str, ...]:
    """Device classes for the TXT record: ``cpu`` plus each GPU backend (cuda, rocm, mps)."""
    backends = {str(g.get("backend")) for g in capabilities.get("gpus", []) if g.get("backend")}
    return ("cpu", *sorted(backends))


def _peer_address(peer: Peer) -> BoardAddress | None:
    """The peer's board URL: its first IPv4 address, else a global-scope IPv6 one."""
    v4 = [a for a in peer.addresses if "." in a and ":" not in a]
    v6 = [a for a in peer.addresses if ":" in a and "%" not in a]
    if v4:
        host = v4[0]
    elif v6:
        host = f"[{v6[0]}]"
    else:
        return None
    return BoardAddress(f"https://{host}:{peer.port}", peer.fingerprint)
