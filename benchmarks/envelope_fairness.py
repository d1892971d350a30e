"""How long an honest lessee waits for a big envelope while one address's slow readers ask for it first.

``PYTHONPATH=. .venv/bin/python benchmarks/envelope_fairness.py [--slow 40] [--read-bps 8192]``
starts a real board (in this process, real TLS, bound to 0.0.0.0 as a hub strangers reach) with one job whose
signed manifest is 12 MB (bigger than a loopback socket's buffers: a 900 KB one would sit in them whole, and
slow reading would cost the board nothing here), gives ``--slow`` agents and one honest agent a lease of it, lets
every slow agent open its envelope stream from 127.0.0.3 and read ``--read-bps`` bytes a second, then times the
honest agent's fetch from 127.0.0.4, twice: with the board's defaults, and with the fairness bounds off
(``max_envelope_streams_per_address`` 0, ``min_envelope_read_bytes_per_s`` 0: the board before them). An honest
fetch that has not finished after ``--give-up-s`` counts as starved.

Output: one JSON object. Compare the two modes of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.client.board import BoardClient
from agent.client.submitting import make_envelope
from hub.home import HubHome
from hub.server import BoardServer
from jobs.manifest import Manifest
from jobs.protocol import LeaseReply, LeaseRequest
from jobs.requirements import Capabilities
from jobs.wire import MSGPACK
from security.httpsig import sign_request
from security.identity import Identity
from security.tls import server_context

__all__ = ["main"]

MIB = 1024 * 1024
SLOW_SOURCE, HONEST_SOURCE = "127.0.0.3", "127.0.0.4"
OFF = {"max_envelope_streams_per_address": 0, "min_envelope_read_bytes_per_s": 0.0}


async def _slow_reader(port: int, agent: Identity, path: str, bps: int, stop: asyncio.Event) -> None:
    """Ask for ``path`` from SLOW_SOURCE with a small receive buffer, then read ``bps`` bytes a second."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((SLOW_SOURCE, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname="localhost", limit=4096)
    headers = {**sign_request(agent, "GET", path, "", b""), "Accept": MSGPACK, "Host": f"127.0.0.1:{port}"}
    writer.write((f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                  + "\r\n").encode())
    try:
        while await reader.read(max(1, bps // 10)):   # a tenth of a second's worth, ten times a second
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
                return
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def run_mode(slow: int, bps: int, give_up_s: float, **settings: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        home = HubHome(Path(tmp) / "hub")
        home.init("127.0.0.1", 0)
        config = home.config(bind="0.0.0.0", port=0, registration="open", inline_envelope_bytes=256,
                             max_body_bytes=16 * MIB, lease_ttl_s=600.0, **settings)
        server = BoardServer(config, home.db_path, server_context(home.cert_path, home.tls_key_path))
        port = await server.start()
        address = home.address(config, port)
        stop = asyncio.Event()
        readers: list[asyncio.Task[None]] = []
        clients: list[BoardClient] = []
        try:
            user = Identity.generate()
            await server.add_submitter(user.public, "bench")
            manifest = Manifest.from_dict({"apiVersion": "panal/v1", "kind": "Job",
                                           "metadata": {"name": "big", "labels": {"pad": "x" * 12 * MIB}},
                                           "spec": {"task": "sleep", "sweep": {"seconds": [0.0] * (slow + 1)}}})
            job = (await server.board.submit(make_envelope(user, manifest), user.id))[0].id
            agents = [Identity.generate() for _ in range(slow + 1)]
            caps = Capabilities.from_dict({"kinds": ["sleep"]})
            for agent in agents:
                await server.board.register_agent(agent.public, "bench", caps)
                client = BoardClient(address, agent, retry_for_s=5)
                clients.append(client)
                reply = await client.post("/v1/lease", LeaseRequest(1, 0.0, (), {}), LeaseReply.decode)
                assert [t.job_id for t in reply.tasks] == [job], "every agent leases one task of the big job"
            path = f"/v1/jobs/{job}/envelope"
            readers = [asyncio.create_task(_slow_reader(port, a, path, bps, stop)) for a in agents[:slow]]
            await asyncio.sleep(2.0)   # every slow reader asked (and holds a slot, or waits for one)
            honest = BoardClient(address, agents[slow], retry_for_s=1, local_address=HONEST_SOURCE)
            clients.append(honest)
            started = time.perf_counter()
            try:
                await honest.call("GET", path, retry=False, timeout_s=give_up_s, max_reply_bytes=16 * MIB)
                waited: float | None = round(time.perf_counter() - started, 2)
            except Exception:
                waited = None
            return {"honest_fetch_s": waited, "starved": waited is None}
        finally:
            stop.set()
            await asyncio.gather(*readers, return_exceptions=True)
            for client in clients:
                await client.close()
            await server.stop(drain=False)


async def run(slow: int, bps: int, give_up_s: float) -> dict[str, Any]:
    return {"slow_readers": slow, "slow_read_bytes_per_s": bps, "envelope_bytes": 12 * MIB,
            "defaults": await run_mode(slow, bps, give_up_s),
            "bounds_off": await run_mode(slow, bps, give_up_s, **OFF)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", type=int, default=40, help="slow-reading lessees on one address")
    parser.add_argument("--read-bps", type=int, default=8192, help="how fast each reads, bytes a second")
    parser.add_argument("--give-up-s", type=float, default=90.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.slow, args.read_bps, args.give_up_s)), indent=1))


if __name__ == "__main__":
    main()
