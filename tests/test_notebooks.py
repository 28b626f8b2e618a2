"""Chapter notebooks: stored stripped, and every chapter opens the same way.

Conventions (book/introduction.ipynb shows them):

1. The first code cell is the Colab install, guarded so it does nothing anywhere else::

       # Colab only: installs peftlab and its lab dependencies; does nothing anywhere else.
       import sys
       if "google.colab" in sys.modules:
           %pip install -q "peftlab[lab] @ git+https://github.com/peftlab/peftlab"

2. The second code cell picks the run profile::

       from peftlab.lab import profile
       P = profile.setup()

   Only markdown cells (a title, an introduction) may come before these two.
3. Sources are stripped: no outputs, no execution counts, no execution timing, no widget
   state. The book build executes them. Fix a notebook with ``make strip``.
4. Every notebook under book/ is in _toc.yml, and every _toc.yml entry exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
NOTEBOOKS = sorted(p for p in BOOK.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)

INSTALL_COMMENT = (
    "# Colab only: installs peftlab and its lab dependencies; does nothing anywhere else."
)
COLAB_GUARD = 'if "google.colab" in sys.modules:'
PIP_PEFTLAB = re.compile(r'^\s+%pip install -q "peftlab\[lab\] @ git\+https://github\.com/peftlab/peftlab"')
PROFILE_IMPORT = "from peftlab.lab import profile"
PROFILE_SETUP = re.compile(r"^P = profile\.setup\(.*\)\s*$")
FIX = "run `make strip` (python tools/strip_notebooks.py) and commit the result"


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _code_cells_after_markdown(nb: nbformat.NotebookNode) -> list:
    """The first two code cells, checking only markdown cells come before them."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            found.append((i, cell))
            if len(found) == 2:
                break
        elif cell.cell_type != "markdown" and not found:
            raise AssertionError(f"cell {i} is a {cell.cell_type} cell before the install cell")
    return found


def test_book_has_notebooks() -> None:
    assert NOTEBOOKS, f"no notebooks found under {_rel(BOOK)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_rel)
def test_notebook_is_valid(path: Path) -> None:
    nb = _read(path)
    nbformat.validate(nb)
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    assert kernel in (None, "python3"), (
        f"{_rel(path)}: kernelspec {kernel!r}; use 'python3' so nbmake and Colab find it"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_rel)
def test_notebook_is_stripped(path: Path) -> None:
    nb = _read(path)
    problems = []
    if "widgets" in nb.metadata:
        problems.append("notebook metadata holds widget state ('widgets')")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} ({cell.get('id', '?')}) has {len(cell.outputs)} output(s)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution_count {cell.execution_count}")
        if "execution" in cell.get("metadata", {}):
            problems.append(f"cell {i} has execution timing metadata")
    assert not problems, f"{_rel(path)} is not stripped:\n  " + "\n  ".join(problems) + f"\n{FIX}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_rel)
def test_first_cell_is_guarded_colab_install(path: Path) -> None:
    cells = _code_cells_after_markdown(_read(path))
    assert cells, f"{_rel(path)} has no code cell; the first one must be the Colab install"
    i, cell = cells[0]
    lines = [ln for ln in cell.source.splitlines() if ln.strip()]
    where = f"{_rel(path)} cell {i} (first code cell)"
    assert lines and lines[0] == INSTALL_COMMENT, f"{where} must start with {INSTALL_COMMENT!r}"
    assert "import sys" in lines and COLAB_GUARD in lines, (
        f"{where} must guard the install with `import sys` and `{COLAB_GUARD}`"
    )
    guard = lines.index(COLAB_GUARD)
    body = lines[guard + 1 :]
    # everything after the guard is indented under it, so nothing runs outside Colab
    outside = [ln for ln in body if not ln.startswith((" ", "\t"))]
    assert body and not outside, f"{where}: lines outside the Colab guard: {outside or 'no body'}"
    assert any(PIP_PEFTLAB.match(ln) for ln in body), (
        f'{where} must `%pip install -q "peftlab[lab] @ git+https://github.com/peftlab/peftlab"`'
    )
    allowed_before = {INSTALL_COMMENT, "import sys"}
    extra = [ln for ln in lines[:guard] if ln not in allowed_before and not ln.startswith("#")]
    assert not extra, f"{where}: code before the Colab guard runs everywhere: {extra}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_rel)
def test_second_cell_sets_up_profile(path: Path) -> None:
    cells = _code_cells_after_markdown(_read(path))
    assert len(cells) == 2, f"{_rel(path)} needs a second code cell: the profile cell"
    i, cell = cells[1]
    lines = [ln.rstrip() for ln in cell.source.splitlines()]
    where = f"{_rel(path)} cell {i} (second code cell)"
    assert PROFILE_IMPORT in lines, f"{where} must contain `{PROFILE_IMPORT}`"
    assert any(PROFILE_SETUP.match(ln) for ln in lines), (
        f"{where} must contain `P = profile.setup()` (it prints profile, device and versions)"
    )


def _toc_files(node: object) -> list[str]:
    files: list[str] = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if isinstance(node.get(key), str):
                files.append(node[key])
        for value in node.values():
            if isinstance(value, (dict, list)):
                files.extend(_toc_files(value))
    elif isinstance(node, list):
        for item in node:
            files.extend(_toc_files(item))
    return files


def _resolve(entry: str) -> Path | None:
    base = ROOT / entry
    for suffix in ("", ".ipynb", ".md"):
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def test_toc_entries_exist() -> None:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    missing = [e for e in _toc_files(toc) if _resolve(e) is None]
    assert not missing, f"_toc.yml lists files that do not exist (the build would fail): {missing}"


def test_every_chapter_is_in_toc() -> None:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = {_resolve(e) for e in _toc_files(toc)}
    chapters = NOTEBOOKS + sorted(BOOK.rglob("*.md"))
    absent = [_rel(p) for p in chapters if p not in listed and "_static" not in p.parts]
    assert not absent, (
        f"not in _toc.yml, so the book would silently leave them out: {absent}; "
        "add a `- file: book/<name>` line"
    )
