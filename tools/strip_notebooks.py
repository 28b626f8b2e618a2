"""Strip notebooks in place: no outputs, execution counts, timing or widget state.

Source notebooks are stored stripped (tests/test_notebooks.py checks it); the book build
executes them. Usage: ``python tools/strip_notebooks.py [PATH ...]`` (default: every
notebook under book/). Cell ids, tags and other metadata are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def strip(path: Path) -> bool:
    """Strip one notebook; return True if it changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + ("" if after.endswith("\n") else "\n"), encoding="utf-8")
        return True
    return False


def main(argv: list[str]) -> None:
    paths = [Path(a) for a in argv] or sorted(
        p for p in (ROOT / "book").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
    )
    for p in paths:
        if strip(p):
            print(f"stripped {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
