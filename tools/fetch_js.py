"""Bring in the JavaScript the offline book needs, from the npm registry, at build time.

The built HTML must render math and ipywidgets with no network, so MathJax 3 and the
ipywidgets HTML manager are served from the book itself. Nothing third-party is committed:
this script fetches pinned packages with ``npm pack`` (npm checks each tarball against the
registry's integrity hash) and unpacks the files the book uses into ``_vendor/`` (git-ignored):

    _vendor/site/_static/vendor/mathjax/   <- mathjax@3  es5/ (CommonHTML output, fonts, extensions)
    _vendor/site/_static/vendor/widgets/   <- @jupyter-widgets/html-manager  dist/embed.js (+ fonts)

``_config.yml`` lists ``_vendor/site`` in ``html_extra_path``, so Sphinx copies it over the
output root: the files end up in ``_build/html/_static/vendor/`` next to the theme's assets,
and ``mathjax_path`` / ``nb_ipywidgets_js`` point there. (``html_extra_path`` rather than
``html_static_path`` because Jupyter Book adds every ``.js`` found on the static path to
every page, which would load all of MathJax's components eagerly.)

Usage: ``python tools/fetch_js.py [--dest _vendor] [--force]``. A second run with the same
pins does nothing (a stamp file records them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Pinned packages: name@version -> (folder inside the tarball, target under vendor/, files to skip)
PACKAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # MathJax 3: the tex-mml-chtml combined component plus what it loads on demand
    # (TeX extensions, CommonHTML fonts, accessibility menu). SVG output is not used.
    "mathjax@3.2.2": ("package/es5", "mathjax", ("*svg*", "node-main.js")),
    # ipywidgets 8 HTML manager. embed.js renders the standard widgets (controls, output)
    # without RequireJS; its fonts are found relative to the script (webpack auto publicPath).
    "@jupyter-widgets/html-manager@1.0.15": (
        "package/dist",
        "widgets",
        ("*.map", "embed-amd.js", "libembed-amd.js"),
    ),
}
STAMP = ".fetched.json"


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        sys.exit(
            "fetch_js: npm not found. The offline book needs MathJax and the ipywidgets "
            "embed bundle from the npm registry; install Node.js with npm (Debian: "
            "`apt-get install -y npm`) and run `make` again."
        )
    return npm


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, p) for p in patterns)


def fetch(dest: Path, force: bool = False) -> Path:
    """Fetch the pinned packages into ``dest/site/_static/vendor``; return that folder."""
    vendor = dest / "site" / "_static" / "vendor"
    stamp = dest / STAMP
    wanted = sorted(PACKAGES)
    if not force and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        if all((vendor / target).is_dir() for _, target, _ in PACKAGES.values()):
            print(f"fetch_js: {', '.join(wanted)} already in {dest}")
            return vendor

    npm = _npm()
    if dest.exists():
        shutil.rmtree(dest)
    vendor.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec, (inner, target, skip) in PACKAGES.items():
            print(f"fetch_js: npm pack {spec}")
            out = subprocess.run(
                [npm, "pack", spec, "--json", "--pack-destination", tmp],
                check=True,
                capture_output=True,
                text=True,
                cwd=tmp,
            )
            tarball = Path(tmp) / json.loads(out.stdout)[0]["filename"]
            unpacked = Path(tmp) / target
            with tarfile.open(tarball) as tar:
                tar.extractall(unpacked, filter="data")
            src = unpacked / inner
            if not src.is_dir():
                sys.exit(f"fetch_js: {spec} has no {inner}/ (package layout changed?)")
            shutil.copytree(
                src,
                vendor / target,
                ignore=lambda d, names, skip=skip: [n for n in names if _skipped(n, skip)],
            )
            # The licence travels with the code it covers.
            for lic in (unpacked / "package").glob("LICENSE*"):
                shutil.copy2(lic, vendor / target / lic.name)
    stamp.write_text(json.dumps(wanted))
    n = sum(1 for p in vendor.rglob("*") if p.is_file())
    print(f"fetch_js: {n} files in {vendor}")
    return vendor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=ROOT / "_vendor")
    ap.add_argument("--force", action="store_true", help="fetch again even if the stamp matches")
    args = ap.parse_args()
    fetch(args.dest, args.force)


if __name__ == "__main__":
    main()
