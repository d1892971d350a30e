"""Hub (board) settings: loaded once into a frozen object. Precedence: flag > env > file > default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hub.settings import load_settings
from security.errors import BadRequest

__all__ = ["LOOPBACK_BINDS", "REGISTRATION_MODES", "HubConfig"]

ENV_PREFIX = "PANAL_HUB_"
REGISTRATION_MODES = ("auto", "token", "open")
LOOPBACK_BINDS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class HubConfig:
    """Every knob of a board. Units live in the names."""

    host: str = "127.0.0.1"            # the address agents use (goes into the join URL and cert)
    bind: str = "0.0.0.0"
    port: int = 8747
    tls: bool = True                   # plain HTTP only on loopback or with insecure=true
    insecure: bool = False
    lease_ttl_s: float = 30.0          # a lease not heartbeated for this long is requeued
    max_poll_wait_s: float = 20.0      # the longest a lease request long-polls
    #: pacing of idle agents (hub/pacing.py): an agent the board had nothing for is told to wait before it
    #: asks again, so that the agents with nothing to do send about ``idle_polls_per_s`` requests a second
    #: and half of ``max_long_polls`` at most wait at once; never longer than ``max_poll_interval_s``, never
    #: shorter than ``min_poll_interval_s`` (0: a small fleet asks again at once), with +-25% jitter
    idle_polls_per_s: float = 100.0
    max_poll_interval_s: float = 300.0
    min_poll_interval_s: float = 0.0
    max_tasks_per_lease: int = 64
    #: a job's signed manifest (envelope) up to this size rides in the lease reply, once per agent; a bigger
    #: one (a 100k-task sweep's is 900 KB) is fetched once per agent (GET /v1/jobs/{id}/envelope), streamed
    #: from one shared copy, at most ``max_envelope_streams`` at once: 10k agents waking to a big job must not
    #: each hold a reply of it in memory (hub/envelopes.py)
    inline_envelope_bytes: int = 64 * 1024
    max_envelope_streams: int = 32
    #: fairness of those streams (hub/stream_slots.py): at most this many from one source address (more wait
    #: behind their own; 0: no cap; off on a hub bound to loopback). 4: a volunteer with many keys on one
    #: address holds 4 of the 32, and a lab behind one NAT still fetches 4 at a time over its shared uplink
    max_envelope_streams_per_address: int = 4
    #: ... and a stream that, after the grace, has taken its bytes slower than this on average is closed, so
    #: slots turn over (64 KiB/s: 512 kbit/s; a 900 KB envelope in 14 s; 0: no pace, body_timeout_s alone)
    min_envelope_read_bytes_per_s: float = 64 * 1024
    envelope_read_grace_s: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_tasks_per_job: int = 10_000
    signature_skew_s: float = 300.0    # how far a signature's created time may be from ours
    #: where the board's state lives: sqlite:///PATH (relative: in the hub dir; hub/stores.py);
    #: "" is the hub dir's own database file (board.db)
    store: str = ""
    #: several hubs on one postgresql:// store (hub/election.py): this hub's name in `panal hub status`
    #: ("": host:port), how soon a standby asks clients to retry, how often the active one proves its lock
    hub_id: str = ""
    peer_urls: tuple[str, ...] = ()       # the other hubs' join URLs: carried in this hub's join URL (also=)
    standby_retry_after_s: float = 1.0
    election_check_interval_s: float = 1.0
    #: where blobs live (hub/blobs.py): "" is the hub directory's blobs/; hubs sharing one database must
    #: share this directory too (one path every hub mounts)
    blobs_dir: str = ""
    sqlite_synchronous: str = "normal"  # normal: survives kill -9; full: also survives power loss
    #: who may register a NEW agent (hub/admission.py): token (a join URL with an admission token from
    #: `panal hub tokens create`), open (anyone with the join URL, rate-limited per source address), or
    #: auto: open on a LAN board or a hub bound to loopback only, token otherwise (a WAN hub)
    registration: str = "auto"
    registration_rate_per_min: float = 6.0   # open registration: new agents per source address per minute
    registration_burst: int = 10             # ... and at once
    #: connection hygiene (hub/connections.py): a kept-alive or silent connection must start a request within
    #: idle_timeout_s; from its first byte, TLS handshake + request head within head_timeout_s; a request
    #: body within body_timeout_s (a blob upload: no stall that long)
    head_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    body_timeout_s: float = 60.0
    max_connections: int = 4096               # open connections, all addresses together
    max_connections_per_address: int = 64     # open connections from one source address
    max_long_polls: int = 2048                # lease and job-wait requests waiting at once
    max_streams: int = 64                     # status-page event streams (SSE) open at once
    lan: bool = False                  # embedded in an agent (LAN mode): its trust store lists the submitters
    expiry_interval_s: float = 0.5
    retry_backoff_s: float = 1.0       # first retry delay of a failed task; doubles per attempt
    drain_timeout_s: float = 30.0
    max_blob_bytes: int = 4 * 2**30          # one uploaded file (model, dataset shard, output)
    #: all blobs together (0: no cap). 50 GiB: a dozen full-size models or data sets fit, and a small VPS disk
    #: (80-160 GB) keeps room for the database and the OS when strangers upload what they can
    max_blobs_total_bytes: int = 50 * 2**30
    #: per key (agent or submitter), counting only its uploads that no job or result refers to yet (0: no
    #: cap). 8 GiB / 1,000 blobs: two full-size inputs, or a busy agent's outputs between two GC rounds;
    #: what a job claims stops counting, so honest use never runs into it, junk uploads do
    blob_quota_bytes_per_key: int = 8 * 2**30
    blob_quota_count_per_key: int = 1000
    #: an unreferenced blob is kept this long: the time between uploading inputs and submitting the job
    #: that names them (a HEAD by the uploader, as `panal submit` does before skipping an upload, renews it)
    #: resumable uploads (hub/uploads.py): a big file goes up in chunks of this size, each verified as it
    #: arrives; an unfinished session holds its declared size against the key's quota until it is idle
    #: upload_session_ttl_s; a key keeps at most upload_sessions_per_key open, the board upload_sessions_max
    upload_chunk_bytes: int = 16 * 2**20
    upload_session_ttl_s: float = 10 * 60.0
    upload_sessions_per_key: int = 4
    upload_sessions_max: int = 256
    #: open sessions from one network address, whatever keys it uses (open registration makes keys
    #: free, so per-key caps alone would let one host fill upload_sessions_max)
    upload_sessions_per_address: int = 16
    blob_gc_grace_s: float = 15 * 60.0
    blob_gc_interval_s: float = 60.0
    #: key ids that read every submitter's jobs, results and blobs (the hub operator's own keys)
    admins: tuple[str, ...] = ()
    #: live viewers of the status page (SSE streams) at once; one more gets 503 + Retry-After
    max_status_viewers: int = 100
    #: costly status queries per source address (IPv6: per /64): a search the snapshot's cache can't answer over
    #: a table of over 1,000 rows (a pass over it: up to ~10 ms at 10k agents), a page of over 100 rows (500
    #: agent rows: ~8 ms). A viewer's live search asks again once a snapshot per table (2 s, or ~1 s on a busy
    #: 10k fleet); 0: no limit; off on a hub only this machine reaches (loopback bind and host). Behind a
    #: reverse proxy every viewer shares the proxy's address, so one limit
    status_queries_per_min: float = 120.0
    status_query_burst: int = 30
    status_interval_s: float = 2.0           # the status snapshot is rebuilt this often (and on events, debounced)
    dispatch_policy: str = "priority-fifo"   # priority-fifo | fair-share | best-fit | fastest | adaptive
    #: fair-share / adaptive: submitter id -> weight (a missing submitter weighs 1.0)
    submitter_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    #: black-hole detection (hub/quarantine.py): the last ``quarantine_window`` settled attempts of an agent
    #: (0: off); once it has at least ``quarantine_min_attempts`` of them and this share failed or timed out,
    #: it gets no work for ``quarantine_base_s``, doubling on each repeat, at most ``quarantine_max_s``
    quarantine_window: int = 10
    quarantine_min_attempts: int = 5
    quarantine_failure_ratio: float = 0.8
    quarantine_base_s: float = 60.0
    quarantine_max_s: float = 3600.0
    #: lease bounds (hub/leases.py): an agent holds at most its advertised ``slots`` (capability report) and
    #: never more than ``max_slots_per_agent``; a lease ends ``lease_timeout_grace_s`` after the task's
    #: timeout whatever the heartbeats say (the grace covers fetching inputs and uploading outputs)
    max_slots_per_agent: int = 64
    lease_timeout_grace_s: float = 120.0
    #: the largest signed result record (values, metrics, output digests); outputs go through blobs
    max_result_bytes: int = 256 * 1024
    #: submitter faults (invalid_params, unsupported) fail a task only once this many different agents
    #: report one (hub/submitter_faults.py); 1 trusts the first report (a LAN board with one agent)
    submitter_fault_confirmations: int = 2
    #: upper limits on a job's ``spec.resources`` (a submission over them is refused; ``panal validate
    #: --hub`` reports them): the longest task timeout and the largest per-task memory cap
    max_task_timeout_s: float = 7 * 86400.0
    max_task_memory_gb: float = 256.0
    #: result validation (hub/trust/): the quorum of a job whose manifest gives no policy.validation.
    #: 0 (auto): 2 on a hub strangers can reach (a WAN hub: not LAN mode, not bound to loopback only),
    #: where one lying volunteer must not decide an answer; 1 (each result accepted alone) on a LAN
    #: board or a loopback-only hub (`panal up`, the demo), where one machine must be enough
    validation_quorum: int = 0
    trust_after: int = 10                 # validated results in a row before an agent may run unreplicated
    spot_check_share: float = 0.03        # share of an untrusted agent's leases that re-run a validated unit
    invalid_quarantine_after: int = 3     # invalid results among an agent's last 20 checked ones: quarantine
    invalid_quarantine_s: float = 86400.0
    #: observed speed below this share of the claimed GFLOPS: the agent is placed by the observed figure, flagged
    speed_claim_ratio: float = 0.25

    @classmethod
    def load(cls, path: Path | None = None, env: dict[str, str] | None = None,
             **overrides: Any) -> HubConfig:
        config = load_settings(cls, what="hub", env_prefix=ENV_PREFIX, path=path, env=env, overrides=overrides)
        if config.validation_quorum < 0 or config.trust_after < 1 or not 0 <= config.spot_check_share <= 1:
            raise BadRequest("hub settings: validation_quorum must be >= 0 (0: auto), trust_after >= 1, "
                             "spot_check_share in [0, 1]")
        if config.upload_chunk_bytes < 64 * 1024 or config.upload_sessions_per_key < 1 \
                or config.upload_sessions_max < 1 or config.upload_session_ttl_s <= 0 \
                or config.upload_sessions_per_address < 1:
            raise BadRequest("hub settings: upload_chunk_bytes must be >= 65536, upload_sessions_per_key, "
                             "upload_sessions_per_address and upload_sessions_max >= 1, upload_session_ttl_s > 0")
        if config.max_envelope_streams < 1 or config.max_envelope_streams_per_address < 0 \
                or config.min_envelope_read_bytes_per_s < 0 or config.envelope_read_grace_s < 0:
            raise BadRequest("hub settings: max_envelope_streams must be >= 1, max_envelope_streams_per_address "
                             ">= 0 (0: no cap), min_envelope_read_bytes_per_s and envelope_read_grace_s >= 0")
        if config.sqlite_synchronous not in ("normal", "full"):
            raise BadRequest("hub setting sqlite_synchronous: expected normal or full")
        if config.registration not in REGISTRATION_MODES:
            raise BadRequest(f"hub setting registration: expected one of {', '.join(REGISTRATION_MODES)}, "
                             f"got {config.registration!r}")
        if config.validation_quorum == 0:
            config = dataclasses.replace(config, validation_quorum=1 if config.local_only else 2)
        return config

    @property
    def local_only(self) -> bool:
        """Whether only this machine or a LAN reaches the board (LAN mode, or bound to loopback with a
        loopback ``host``). A loopback bind with a public ``host`` (the name in the join URL) is a hub behind
        a reverse proxy or tunnel: strangers reach it, so it gets a WAN hub's defaults."""
        return self.lan or self.loopback_only

    @property
    def loopback_only(self) -> bool:
        """Bound to loopback and named by a loopback ``host``: only this machine's processes reach it."""
        return self.bind in LOOPBACK_BINDS and self.host in LOOPBACK_BINDS

    @property
    def registration_mode(self) -> str:
        """``token`` or ``open``: what ``registration: auto`` means for this board."""
        if self.registration != "auto":
            return self.registration
        return "open" if self.local_only else "token"

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)
