"""Print one closing line for `make test` from pytest's JUnit XML reports.

Each report gets a line like pytest's own (``unit tests: 120 passed, 0 failed, 3 skipped in
41.2s``); the last line adds them up in the plain form CI reads:
``total: 125 passed, 0 failed, 3 skipped``. Exits non-zero if a report is missing or
records a failure or error.

Usage: ``python tools/test_summary.py REPORT.xml [REPORT.xml ...]``.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

LABELS = {"unit": "unit tests", "notebooks": "notebooks (smoke)"}


def counts(path: Path) -> tuple[int, int, int, float]:
    """(passed, failed, skipped, seconds) for one JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failed = skipped = 0
    seconds = 0.0
    for s in suites:
        tests += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
        seconds += float(s.get("time", 0.0))
    return tests - failed - skipped, failed, skipped, seconds


def main(paths: list[str]) -> int:
    total = [0, 0, 0]
    ok = True
    for p in map(Path, paths):
        if not p.is_file():
            print(f"{p}: missing (that step did not run)")
            ok = False
            continue
        passed, failed, skipped, seconds = counts(p)
        label = LABELS.get(p.stem, p.stem)
        print(f"{label}: {passed} passed, {failed} failed, {skipped} skipped in {seconds:.1f}s")
        total = [total[0] + passed, total[1] + failed, total[2] + skipped]
        ok = ok and failed == 0
    print(f"total: {total[0]} passed, {total[1]} failed, {total[2]} skipped")
    return 0 if ok and total[0] > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
