"""CI sees what the book needs: the render check runs (or fails) under CI, and .ci/run builds the reader's book."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _check(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "page.html").write_text("<html><body><p>no math</p></body></html>")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(Path(sys.executable).parent)  # python only: no chromium on this PATH
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, str(ROOT / "tools" / "check_build.py"), "--html", str(tmp_path)],
                          env=env, capture_output=True, text=True)


def test_render_check_fails_under_ci_without_a_browser(tmp_path: Path) -> None:
    done = _check(tmp_path, "true")
    assert done.returncode == 1
    assert "no Chromium found" in done.stderr and "apt-get install -y chromium" in done.stderr
    assert "render check skipped" not in done.stdout


def test_render_check_skips_outside_ci(tmp_path: Path) -> None:
    done = _check(tmp_path, None)
    assert "render check skipped" in done.stdout
    assert "no Chromium found" not in done.stderr


def test_ci_script_installs_the_browser_and_builds_the_readers_book() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    assert "apt-get update" in run and "chromium" in run and "fonts-noto-cjk" in run
    assert 'export CI="${CI:-true}"' in run
    test_at, book_at = run.index("make test"), run.index("PEFTLAB_PROFILE=cpu make --no-print-directory notebooks")
    assert test_at < book_at and "make --no-print-directory html" in run[book_at:]


def test_notebook_kernels_take_ports_from_their_workers_own_block(monkeypatch) -> None:
    """`make notebooks` loads tools/nbmake_ports.py: two xdist workers never pick the same kernel port, and no
    kernel port comes from the ephemeral range that port-0 binds (torchrun's gloo, jupyter's default) use."""
    import importlib
    import sys

    from jupyter_client.connect import LocalPortCache

    sys.path.insert(0, str(ROOT))
    plugin = importlib.import_module("tools.nbmake_ports")
    assert "-p tools.nbmake_ports" in (ROOT / "Makefile").read_text()
    blocks = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        cache = LocalPortCache()  # a fresh cache per worker process
        ports = [plugin.find_available_port(cache, "127.0.0.1") for _ in range(5)]
        assert len(set(ports)) == 5 and all(20000 <= p < 32768 for p in ports), ports
        blocks.append(set(ports))
    assert not blocks[0] & blocks[1]


def test_a_missed_wakeup_costs_one_poll_step_not_the_cell_timeout() -> None:
    """`make notebooks` loads tools/nbclient_wakeup.py: a shell-channel wait whose poll misses the message's
    arrival (it notices only at its own timeout, as zmq.asyncio's poll did here, stalling a chapter for the whole
    cell timeout) is cut into short polls up to the same deadline; with nothing to read it still raises Empty
    at the deadline, and a wait without a deadline keeps waiting."""
    import asyncio
    import importlib
    from queue import Empty

    sys.path.insert(0, str(ROOT))
    plugin = importlib.import_module("tools.nbclient_wakeup")
    make = (ROOT / "Makefile").read_text()
    assert "-p tools.nbclient_wakeup" in make[make.index("\nnotebooks:"):make.index("\nhtml:")]

    class Channel:  # a message waits from the start (after ``ready_after`` s), but a poll sees it only at its timeout
        def __init__(self, ready_after: float | None) -> None:
            self.socket, self.ready_at = self, None if ready_after is None else time.monotonic() + ready_after
            self.polls = 0

        async def poll(self, timeout_ms: int | None) -> int:
            self.polls += 1
            await asyncio.sleep(timeout_ms / 1000)
            return int(self.ready_at is not None and time.monotonic() >= self.ready_at)

        async def _recv(self) -> dict:
            return {"header": {"msg_type": "execute_reply"}}

    def timed(channel: Channel, timeout: float | None) -> tuple[object, float]:
        start = time.monotonic()
        try:
            got = asyncio.run(plugin.get_msg(channel, timeout))
        except Empty as empty:
            got = empty
        return got, time.monotonic() - start

    got, took = timed(Channel(0.0), 20.0)  # the original waits 20 s here
    assert got == {"header": {"msg_type": "execute_reply"}} and took < 4 * plugin.STEP  # not 20 s
    got, took = timed(Channel(None), 1.2)
    assert isinstance(got, Empty) and 1.2 <= took < 1.2 + 3 * plugin.STEP
    channel = Channel(1.6)
    got, took = timed(channel, None)
    assert isinstance(got, dict) and 1.6 <= took < 1.6 + 4 * plugin.STEP and channel.polls >= 4


def test_a_hanging_unit_test_fails_with_its_stack_and_the_run_goes_on(tmp_path: Path) -> None:
    """`make unit` passes --timeout (pytest-timeout, thread method): a hung test is reported with every thread's
    stack (on the worker's stderr), the run names it, its xdist worker is replaced, and the other tests still run (CI once lost its whole limit to one hang)."""
    make = (ROOT / "Makefile").read_text()
    assert "--timeout=$(UNIT_TIMEOUT) --timeout-method=thread" in make and "UNIT_TIMEOUT ?= " in make
    (tmp_path / "test_hang.py").write_text(
        "import time\n\ndef test_hangs():\n    time.sleep(600)\n\n"
        "def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-n", "2", "-p", "no:cacheprovider",
                           "--timeout=3", "--timeout-method=thread", "-q", "--rootdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert time.perf_counter() - start < 120, done.stdout[-2000:]
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-2000:]
    assert "crashed while running 'test_hang.py::test_hangs'" in out, out[-3000:]  # the hung test, by name
    assert "2 passed" in out and "1 failed" in out, out[-2000:]


def test_make_test_runs_the_smoke_chapters_with_a_short_cell_timeout() -> None:
    """A chapter could stall for a whole cell timeout and then go on (lora.ipynb once waited 600 s with nothing
    running: a missed zmq wake-up, now cut to one short poll by tools/nbclient_wakeup.py); `make test` also bounds
    any such wait by a smoke cell timeout far below the book build's, and well above the slowest smoke cell
    (~30 s)."""
    make = (ROOT / "Makefile").read_text()
    test_target = make[make.index("\ntest: "):make.index("\nunit:")]
    assert "notebooks NB_TIMEOUT=$(SMOKE_NB_TIMEOUT)" in test_target
    smoke = int(re.search(r"^SMOKE_NB_TIMEOUT \?= (\d+)$", make, re.M).group(1))
    full = int(re.search(r"^NB_TIMEOUT \?= (\d+)$", make, re.M).group(1))
    assert 120 <= smoke <= 300 < full
