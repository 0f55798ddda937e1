"""Loopback ports for the benchmarks' receivers: pick a free one, wait until one listens.

The benchmarks start every receiver (radfinder-node, dcmtk, Orthanc, the floors) as a process
of its own and time it only once its port accepts connections.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30, alive: Callable[[], bool] = lambda: True) -> None:
    """Returns once ``port`` accepts; fails early when ``alive`` says the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process meant to listen on {port} exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")
