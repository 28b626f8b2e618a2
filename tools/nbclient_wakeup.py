"""A pytest plugin for the notebook runs (``-p tools.nbclient_wakeup``): no stall of a whole cell timeout.

nbclient waits for a cell's reply with one ``get_msg(timeout=<cell timeout>)`` on the kernel's shell channel,
and that is one ``zmq.asyncio`` poll. Under two xdist workers the poll sometimes misses the message's arrival
and returns only at its timeout, with the message there all along: the notebook then waits the whole cell
timeout (600 s in the book build) doing nothing, and passes. Measured here (pyzmq 27.3, jupyter_client 8.10,
nbclient 0.11): 3 of 240 runs of a five-cell notebook (two runs at a time) sat exactly 20.00 s, the cell
timeout, in ``get_msg`` before an ``execute_reply`` that the kernel had sent at once; a clean-clone CI lost
600 s to one such wait after an ipywidgets cell of lora.ipynb and ~180 s to others. Here every wait is cut into
polls of at most :data:`STEP` seconds up to the same deadline, so a missed wake-up costs at most that.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

from jupyter_client.channels import AsyncZMQSocketChannel

#: the longest single poll, in seconds: what a missed wake-up can cost
STEP = 0.5

_get_msg = AsyncZMQSocketChannel.get_msg


async def get_msg(self: Any, timeout: float | None = None) -> dict[str, Any]:
    """``AsyncZMQSocketChannel.get_msg`` with the same deadline (None: none), polled in steps of at most
    :data:`STEP` seconds; raises ``queue.Empty`` at the deadline as the original does."""
    if timeout is not None and timeout <= STEP:
        return await _get_msg(self, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = STEP if deadline is None else min(STEP, max(deadline - time.monotonic(), 0.0))
        try:
            return await _get_msg(self, step)
        except Empty:
            if deadline is not None and time.monotonic() >= deadline:
                raise


AsyncZMQSocketChannel.get_msg = get_msg
