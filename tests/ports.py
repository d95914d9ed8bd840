"""Ports for servers a test starts later, named before they bind (an address another process must be
told first): picked below the kernel's ephemeral range, so no outgoing connection and no server bound
to port 0 can take one between the pick and the bind."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10_000
_picked: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A loopback port nothing listens on now, outside the ephemeral range, not handed out before."""
    high = _ephemeral_start() - 1
    for _ in range(1_000):
        port = random.randint(_LOWEST, high)
        if port in _picked:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _picked.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")
