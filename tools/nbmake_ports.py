"""A pytest plugin for the notebook runs (``-p tools.nbmake_ports``): kernel ports that cannot collide.

jupyter_client picks a kernel's five ports by binding port 0 and closing the socket; the kernel binds them
a moment later. Two xdist workers starting kernels at once, or a notebook whose ``torchrun`` (gloo) opens
ephemeral ports meanwhile, can take a port in that gap: the kernel then dies before replying, or a client
waits forever on a kernel that is not its own. Each worker here takes its ports from its own block below
the kernel's ephemeral range (which every port-0 bind uses), checking each one is free.
"""

from __future__ import annotations

import os
import socket

from jupyter_client.connect import LocalPortCache

_BLOCK = 2000  # ports per worker
_START = 20000  # below Linux's ephemeral range (32768-60999): never handed out by a port-0 bind


def _worker_index() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...
    return int(name[2:]) if name[2:].isdigit() else 0


def _free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def find_available_port(self: LocalPortCache, ip: str) -> int:
    first = _START + _BLOCK * (_worker_index() % 6)
    nxt = getattr(self, "_peftlab_next", first)
    for _ in range(_BLOCK):
        port, nxt = nxt, first + (nxt + 1 - first) % _BLOCK
        if port not in self.currently_used_ports and _free(ip, port):
            self.currently_used_ports.add(port)
            self._peftlab_next = nxt
            return port
    raise RuntimeError(f"no free port in {first}-{first + _BLOCK - 1} for a kernel")


LocalPortCache.find_available_port = find_available_port
