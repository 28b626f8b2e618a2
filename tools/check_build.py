"""Check a built book (``_build/html``): offline assets, Colab links, and optionally the render.

Checks, each failing with the page and what was found:

1. No page loads a script, stylesheet, font or frame from the network (any ``src``/``href``
   of ``script``, ``link``, ``img``, ``iframe`` that is absolute), and no page names a CDN.
   One inert string is allowed: sphinx-thebe's ``THEBE_JS_URL`` constant, used only if a
   reader starts Thebe, which this book does not enable.
2. MathJax and the ipywidgets manager are served from the site: every page with math loads
   ``_static/vendor/mathjax/tex-mml-chtml.js``, every page with widget state loads
   ``_static/vendor/widgets/embed.js``, and both files exist.
3. Every notebook page has an "Open in Colab" link to its ``.ipynb`` on the repository.
4. ``--render`` (default: when Chromium is installed; always under CI, ``CI=true``, where a
   missing browser fails the check instead of skipping it): headless Chromium, with its network
   features off, loads each page with math or widgets from ``file://`` and the rendered DOM
   must contain MathJax output (``mjx-container``) and live widgets (``widget-...`` views).

Usage: ``python tools/check_build.py [--html _build/html] [--render auto|yes|no]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MATHJAX = "_static/vendor/mathjax/tex-mml-chtml.js"
EMBED = "_static/vendor/widgets/embed.js"
CDN = re.compile(
    r"cdn\.jsdelivr\.net|cdnjs\.cloudflare\.com|unpkg\.com|polyfill\.io|"
    r"fonts\.googleapis\.com|code\.jquery\.com|cdn\.plot\.ly|data-jupyter-widgets-cdn"
)
INERT = re.compile(r'const THEBE_JS_URL = "https://unpkg\.com/[^"]*";')
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class _Assets(HTMLParser):
    """Collect the URLs a page loads and whether it has math or widgets."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.scripts: list[str] = []
        self.has_math = False
        self.has_widget_state = False
        self.has_widget_view = False
        self.colab: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            if a.get("src"):
                self.loads.append(a["src"])
                self.scripts.append(a["src"])
            if a.get("type") == WIDGET_STATE:
                self.has_widget_state = True
            if a.get("type") == WIDGET_VIEW:
                self.has_widget_view = True
        elif tag in ("img", "iframe", "audio", "video", "source") and a.get("src"):
            self.loads.append(a["src"])
        elif tag == "link" and a.get("href"):
            rel = a.get("rel", "")
            if any(r in rel for r in ("stylesheet", "preload", "icon", "modulepreload")):
                self.loads.append(a["href"])
        elif tag == "a" and "colab.research.google.com" in a.get("href", ""):
            self.colab.append(a["href"])
        classes = a.get("class", "").split()
        if "math" in classes or "math-wrapper" in classes:
            self.has_math = True


def _is_remote(url: str) -> bool:
    return bool(re.match(r"^(https?:)?//", url.strip(), re.I))


def _resolves_to(page: Path, src: str, html: Path, target: str) -> bool:
    local = src.split("?", 1)[0].split("#", 1)[0]
    return (page.parent / local).resolve() == (html / target).resolve()


def _notebook_pages() -> dict[str, str]:
    """Map of html page (relative) -> repository path of its notebook, from _toc.yml."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    entries: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    entries.append(node[key])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    out = {}
    for e in entries:
        stem = e[: -len(".ipynb")] if e.endswith(".ipynb") else e
        if (ROOT / f"{stem}.ipynb").is_file():
            out[f"{stem}.html"] = f"{stem}.ipynb"
    return out


def _repo_slug() -> tuple[str, str]:
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    url = cfg["repository"]["url"].rstrip("/")
    m = re.match(r"https://github\.com/([^/]+/[^/]+)$", url)
    if not m:
        sys.exit(f"check_build: repository.url {url!r} is not a github.com/<org>/<repo> URL")
    return m.group(1), cfg["repository"].get("branch", "main")


def check_static(html: Path) -> tuple[list[str], list[Path]]:
    """Run checks 1-3; return (problems, pages that need a render check)."""
    problems: list[str] = []
    to_render: list[Path] = []
    for target in (MATHJAX, EMBED):
        if not (html / target).is_file():
            problems.append(f"{target} missing from {html} (run `python tools/fetch_js.py`)")
    pages = sorted(html.rglob("*.html"))
    if not pages:
        return [f"no HTML pages under {html}; build the book first"], []
    for page in pages:
        rel = page.relative_to(html).as_posix()
        text = page.read_text(encoding="utf-8", errors="replace")
        parser = _Assets()
        parser.feed(text)
        remote = [u for u in parser.loads if _is_remote(u)]
        if remote:
            problems.append(f"{rel} loads from the network: {remote}")
        for m in CDN.finditer(INERT.sub("", text)):
            line = text.count("\n", 0, m.start()) + 1
            problems.append(f"{rel}:{line} names a CDN: {m.group(0)!r}")
        if parser.has_math:
            if not any(_resolves_to(page, s, html, MATHJAX) for s in parser.scripts):
                problems.append(f"{rel} has math but does not load the local {MATHJAX}")
        if parser.has_widget_state or parser.has_widget_view:
            if not any(_resolves_to(page, s, html, EMBED) for s in parser.scripts):
                problems.append(f"{rel} has widgets but does not load the local {EMBED}")
            if parser.has_widget_view and not parser.has_widget_state:
                problems.append(f"{rel} shows widgets but carries no widget state")
        if parser.has_math or parser.has_widget_view:
            to_render.append(page)

    slug, branch = _repo_slug()
    for page_rel, nb in _notebook_pages().items():
        page = html / page_rel
        if not page.is_file():
            problems.append(f"{page_rel} missing (notebook {nb} is in _toc.yml)")
            continue
        parser = _Assets()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        want = f"https://colab.research.google.com/github/{slug}/blob/{branch}/{nb}"
        if want not in parser.colab:
            problems.append(f"{page_rel} has no Colab link to {want} (found {parser.colab})")
    return problems, to_render


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_render(html: Path, pages: list[Path], browser: str) -> list[str]:
    """Run check 4 with headless Chromium and no network features."""
    problems = []
    for page in pages:
        rel = page.relative_to(html).as_posix()
        text = page.read_text(encoding="utf-8", errors="replace")
        parser = _Assets()
        parser.feed(text)
        with tempfile.TemporaryDirectory() as profile:
            cmd = [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-quic", f"--user-data-dir={profile}",
                "--virtual-time-budget=8000", "--dump-dom", page.resolve().as_uri(),
            ]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                problems.append(f"{rel}: Chromium timed out")
                continue
        dom = out.stdout
        if not dom:
            problems.append(f"{rel}: Chromium returned no DOM ({out.stderr.strip()[-300:]})")
            continue
        if parser.has_math and "<mjx-container" not in dom:
            problems.append(f"{rel}: math did not render (no mjx-container in the DOM)")
        if parser.has_widget_view and not re.search(r'class="[^"]*\bwidget-', dom):
            problems.append(f"{rel}: widgets did not render (no widget views in the DOM)")
        print(f"check_build: rendered {rel}: math={parser.has_math} widgets={parser.has_widget_view}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--render", choices=("auto", "yes", "no"), default="auto")
    args = ap.parse_args()
    if args.render == "auto" and os.environ.get("CI", "").lower() in ("true", "1"):
        args.render = "yes"  # CI must see the render check run, never a skip

    problems, to_render = check_static(args.html)
    browser = _chromium()
    if args.render == "yes" and browser is None:
        problems.append("--render yes, but no Chromium found (Debian: apt-get install -y chromium)")
    elif args.render != "no" and browser is not None:
        problems += check_render(args.html, to_render, browser)
    elif args.render == "auto":
        print("check_build: Chromium not installed; render check skipped")

    if problems:
        print("check_build: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    n = len(list(args.html.rglob("*.html")))
    print(f"check_build: {n} pages OK (offline assets, local MathJax and widgets, Colab links)")


if __name__ == "__main__":
    main()
