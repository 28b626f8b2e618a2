"""Lay out a scratch copy of the book for one execution run plus one render.

``make book`` and ``make test`` execute every notebook exactly once, with nbmake, and then
build the HTML from the executed copies with execution off. The sources must stay stripped,
so the run happens in a copy:

    .cache/book-exec/_config.yml, _toc.yml   copied
    .cache/book-exec/book/                   copied (nbmake --overwrite writes outputs here);
                                             only the notebooks _toc.yml lists, so a draft
                                             notebook not yet in the book is not run
    .cache/book-exec/<everything else>       relative symlinks to the repository (peftlab/
                                             for literalinclude, _vendor/ for the offline
                                             JavaScript)

The copy lives under the git-ignored ``.cache/``, not ``_build/``: nbmake refuses to collect
any notebook whose path contains a ``_build`` folder.

Usage: ``python tools/prepare_exec.py [DEST]`` (default ``.cache/book-exec``).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("_config.yml", "_toc.yml", "book")
SKIPPED = {"_build", ".git", ".venv"}


def toc_entries(root: Path = ROOT) -> list[str]:
    """Every page ``_toc.yml`` lists (its root and each ``file``), in order, without a suffix: ``book/lora``."""
    import yaml

    entries: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                entry = node.get(key)
                if isinstance(entry, str):
                    entries.append(re.sub(r"\.(ipynb|md)$", "", entry))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load((root / "_toc.yml").read_text()))
    return entries


def toc_notebooks(root: Path = ROOT) -> set[Path]:
    """The notebooks that ``_toc.yml`` lists (absolute paths)."""
    return {(root / f"{e}.ipynb").resolve() for e in toc_entries(root) if (root / f"{e}.ipynb").is_file()}


def prepare(dest: Path) -> Path:
    """Recreate ``dest`` as an executable copy of the book; return it."""
    dest = dest.resolve()
    if ROOT not in dest.parents:
        sys.exit(f"prepare_exec: {dest} is not inside the repository {ROOT}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    in_toc = toc_notebooks()

    def ignore(folder: str, names: list[str]) -> list[str]:
        skip = []
        for n in names:
            p = (Path(folder) / n).resolve()
            if n in (".ipynb_checkpoints", "__pycache__"):
                skip.append(n)
            elif n.endswith(".ipynb") and p not in in_toc:
                print(f"prepare_exec: {p.relative_to(ROOT)} is not in _toc.yml; not run")
                skip.append(n)
        return skip

    for entry in sorted(ROOT.iterdir()):
        name = entry.name
        if name in SKIPPED or name.startswith(".") or entry in dest.parents:
            continue
        target = dest / name
        if name in COPIED:
            if entry.is_dir():
                shutil.copytree(entry, target, ignore=ignore)
            else:
                shutil.copy2(entry, target)
        else:
            # relative, so the copy keeps working if the checkout moves
            target.symlink_to(os.path.relpath(entry, dest), target_is_directory=entry.is_dir())
    for name in COPIED:
        if not (dest / name).exists():
            sys.exit(f"prepare_exec: {ROOT / name} is missing")
    print(f"prepare_exec: book copied to {dest.relative_to(ROOT)}")
    return dest


if __name__ == "__main__":
    prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".cache" / "book-exec")
