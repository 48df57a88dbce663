"""Free TCP ports on the loopback interface."""

from __future__ import annotations

import socket


_given: set[int] = set()  # ports handed out by free_port() in this process


def free_port(host: str = "127.0.0.1") -> int:
    """A free port, never one this process was given before: a test that starts several servers calls this once per
    server before any of them listens, and the kernel may hand the same free port out twice (seen: "Could not start
    listen" in a CI run)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port
    raise OSError("no free port that was not handed out before")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (all held open while choosing: ``free_port()`` twice may return the same one)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
