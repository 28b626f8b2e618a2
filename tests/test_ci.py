"""CI sees what the book needs: the render check runs (or fails) under CI, and .ci/run builds the reader's book."""

from __future__ import annotations

import os
import subprocess
import sys
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
