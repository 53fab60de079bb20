"""Helpers of the tests that start processes: a free loopback port, and a stop that always ends the process."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(*procs: subprocess.Popen, grace: float = 30.0) -> None:
    """Terminates each process, and kills it if it is still there after ``grace`` seconds."""
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
