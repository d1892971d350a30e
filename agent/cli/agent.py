"""``panal agent ...`` (with ``service`` and pause/resume/status mounted from their modules) and ``panal up``."""

from __future__ import annotations

import asyncio

import click

from agent.cli.common import PanalGroup, home, print_json, run, until_signalled
from agent.cli.control import COMMANDS as CONTROL_COMMANDS
from agent.cli.service import service
from agent.client.board import BoardClient
from agent.daemon import Daemon, DaemonSettings
from agent.daemon.hooks import CodeConsent
from agent.host import capabilities
from agent.volunteer.naming import agent_name, save_name
from hub.admission import TOKEN_HEADER
from hub.config import HubConfig
from hub.server import BoardServer
from jobs.protocol_registration import Registered, Registration
from jobs.requirements import Capabilities
from security.errors import PanalError
from security.tls import BoardAddress, join_token


@click.group(cls=PanalGroup)
def agent() -> None:
    """Lend this machine: join boards and run their work."""


@agent.command()
@click.argument("join_url")
@click.option("--name", default="", help="How this agent appears on boards, kept for later runs (default: a name "
              "generated from its key, like swift-otter-0412; never the hostname).")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP to a non-loopback board.")
@click.option("--allow-code", is_flag=True, help="Run code from this board's authorised submitters (the `python` "
              "kind, in the sandbox): the board vouches for them. Off unless given.")
def join(join_url: str, name: str, insecure: bool, allow_code: bool) -> None:
    """Join a board: pin its certificate from the join URL and register this agent (signed).

    A hub on the internet admits new agents only with the admission token its join URL carries
    (`panal hub tokens create` makes one); the token is sent in a header, once, and not stored."""
    address = BoardAddress.parse(join_url)
    token = join_token(join_url)
    address.check_transport(insecure)
    h = home()
    identity = h.agent_identity()
    try:
        if name:
            save_name(h.root, name)
        shown = agent_name(h.root, identity.id)
    except PanalError as exc:
        raise click.BadParameter(exc.message, param_hint="--name") from exc
    body = Registration(identity.public, shown, Capabilities.from_dict(capabilities.basic()))

    async def go() -> Registered:
        async with BoardClient(address, identity, insecure=insecure, retry_for_s=10.0) as client:
            return await client.post("/v1/agents", body, Registered.decode,
                                     headers={TOKEN_HEADER: token} if token else None)

    reply = run(go())
    h.add_board(address, allow_code=allow_code)
    if not h.client_settings().get("hub"):
        h.set_client("hub", address.join_url())
    click.echo(f"joined {address.url} as agent {reply.agent_id} (shown as {shown!r}; "
               "change it with `panal agent join URL --name NAME`)"
               + (": accepting code from its submitters" if allow_code else ""))


@agent.command("run")
@click.option("--slots", type=click.IntRange(0, 256), default=0,
              help="Tasks run at the same time, one warm worker each (default: the max_concurrent_tasks "
                   "preference, 1 unless set with `panal agent set`).")
@click.option("--threads", type=int, default=0, help="CPU threads per task (default: cores / slots).")
@click.option("--name", default="", help="How this agent appears on boards for this run (default: the name "
              "given to `panal agent join --name`, else one generated from its key).")
@click.option("--insecure", is_flag=True, help="Allow plain HTTP to non-loopback boards.")
@click.option("--drain", "drain_s", type=float, default=30.0, show_default=True,
              help="On SIGTERM, seconds to let running tasks finish before handing them back.")
@click.option("--lan/--no-lan", "lan", default=None,
              help="LAN mode: embed a board, find peers over mDNS and share work (default: on; "
                   "`lan.enabled` in agent.yaml).")
@click.option("--lan-port", type=click.IntRange(0, 65535), default=None,
              help="Port of this agent's LAN board (default: any free one).")
@click.option("--lan-interface", "lan_interfaces", multiple=True, metavar="NAME|CIDR",
              help="Interfaces (or networks) LAN mode may use; repeatable (default: every private one).")
@click.option("--lan-open", is_flag=True, default=None,
              help="Run LAN work from ANY submitter (classrooms): the trust store is not checked.")
def agent_run(slots: int, threads: int, name: str, insecure: bool, drain_s: float, lan: bool | None,
              lan_port: int | None, lan_interfaces: tuple[str, ...], lan_open: bool | None) -> None:
    """Run the volunteer daemon until SIGTERM/SIGINT."""
    from agent.lan.mode import LanMode
    from agent.lan.settings import LanSettings

    h = home()
    lan_settings = LanSettings.load(h.root / "agent.yaml", enabled=lan, port=lan_port, interfaces=lan_interfaces,
                                    open=lan_open)
    settings = DaemonSettings(slots=slots, threads=threads, name=name, insecure=insecure, drain_s=drain_s)
    daemon = Daemon(h, h.boards(), settings, allow_no_board=lan_settings.enabled)
    lan_mode = LanMode(h, lan_settings) if lan_settings.enabled else None
    if lan_mode is not None:
        daemon.on_start.append(lan_mode.start)
    click.echo(f"panal agent {daemon.identity.id} starting ({daemon.settings.slots} slot(s))")

    async def main(stop: asyncio.Event) -> None:
        try:
            await daemon.run(stop)
        finally:
            if lan_mode is not None:
                await lan_mode.stop()

    run(until_signalled(main))


@agent.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--rebench", is_flag=True, help="Re-run the GFLOPS self-test instead of using the cached figures.")
@click.option("--no-measure", is_flag=True, help="Skip the self-test (faster).")
def info(as_json: bool, rebench: bool, no_measure: bool) -> None:
    """What this agent advertises to boards: devices (each checked with a tiny job), measured speed."""
    from agent.host.capabilities import detect

    h = home()
    h.ensure()
    caps = detect(measure=not no_measure, cache_path=h.root / "capabilities-cache.json", rebench=rebench)
    if as_json:
        print_json(caps)
        return
    click.echo(f"agent id: {home().agent_identity().id}")
    for key, value in caps.items():
        if key != "sandbox":
            click.echo(f"{key}: {value}")
    sandbox = caps.get("sandbox") or {}
    if sandbox.get("available"):
        click.echo(f"sandbox: {sandbox.get('tool')}: submitter code (the python kind) can run here, with consent "
                   "(`panal trust add KEY --code`, `panal agent join URL --allow-code`)")
    else:
        click.echo(f"sandbox: unavailable: {sandbox.get('reason')}: submitter code (the python kind) is not "
                   f"advertised\n  to enable: {sandbox.get('fix')}")


@agent.command("set", context_settings={"ignore_unknown_options": True})  # `-3` is a value to check
@click.argument("key")
@click.argument("value")
def set_preference_cmd(key: str, value: str) -> None:
    """Set a volunteer preference (a running agent applies it within a second), e.g.
    `panal agent set cpu_threads 4`, `panal agent set time_windows "weekdays 19:00-08:00"`."""
    from agent.volunteer.preferences import set_preference

    h = home()
    h.ensure()
    prefs = set_preference(h.root / "prefs.yaml", key, value)
    click.echo(f"{key} = {prefs.to_yaml_dict()[key]}")


agent.add_command(service)
for _command in CONTROL_COMMANDS:
    agent.add_command(_command)


@click.command()
@click.option("--port", type=int, default=8749, show_default=True, help="Port on 127.0.0.1 (0: any).")
@click.option("--slots", type=click.IntRange(1, 256), default=1, show_default=True)
def up(port: int, slots: int) -> None:
    """Standalone mode: a board and an agent in one process on 127.0.0.1 (plain HTTP, loopback only)."""
    h = home()
    h.ensure()
    me = h.user_identity()

    async def main(stop: asyncio.Event) -> None:
        config = HubConfig(host="127.0.0.1", bind="127.0.0.1", port=port, tls=False)
        server = BoardServer(config, h.root / "local-board.db", None)
        bound = await server.start()
        await server.add_submitter(me.public, "owner")
        address = BoardAddress(f"http://127.0.0.1:{bound}")
        h.local_board.write_text(address.url + "\n")
        click.echo(f"panal up: board at {address.url}; submit with `panal submit FILE` (Ctrl-C stops)")
        daemon = Daemon(h, [address], DaemonSettings(slots=slots, poll_wait_s=5.0))
        owner = frozenset({me.id})
        daemon.board_code[address.url] = CodeConsent(keys=lambda: owner)   # your own code, in the sandbox
        try:
            await daemon.run(stop)
        finally:
            h.local_board.unlink(missing_ok=True)
            await server.stop(drain=False)

    run(until_signalled(main))
