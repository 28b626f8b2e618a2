"""Lay out a scratch copy of the book for one execution run plus one render.

``make book`` and ``make test`` execute every notebook exactly once, with nbmake, and then
build the HTML from the executed copies with execution off. The sources must stay stripped,
so the run happens in a copy:

    .cache/book-exec/_config.yml, _toc.yml   copied
    .cache/book-exec/book/                   copied (nbmake --overwrite writes outputs here)
    .cache/book-exec/<everything else>       relative symlinks to the repository (peftlab/
                                             for literalinclude, _vendor/ for the offline
                                             JavaScript)

The copy lives under the git-ignored ``.cache/``, not ``_build/``: nbmake refuses to collect
any notebook whose path contains a ``_build`` folder.

Usage: ``python tools/prepare_exec.py [DEST]`` (default ``.cache/book-exec``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("_config.yml", "_toc.yml", "book")
SKIPPED = {"_build", ".git", ".venv"}


def prepare(dest: Path) -> Path:
    """Recreate ``dest`` as an executable copy of the book; return it."""
    dest = dest.resolve()
    if ROOT not in dest.parents:
        sys.exit(f"prepare_exec: {dest} is not inside the repository {ROOT}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for entry in sorted(ROOT.iterdir()):
        name = entry.name
        if name in SKIPPED or name.startswith(".") or entry in dest.parents:
            continue
        target = dest / name
        if name in COPIED:
            if entry.is_dir():
                shutil.copytree(
                    entry, target, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__")
                )
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
