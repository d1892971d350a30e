"""The volunteer daemon: board links, task execution, slots, devices, outbox, kind health."""

from agent.daemon.daemon import Daemon
from agent.daemon.settings import DaemonSettings

__all__ = ["Daemon", "DaemonSettings"]
