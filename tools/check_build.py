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
4. What a reader must not see (every page): a markdown table left as raw text (``| --- |`` outside
   code), a Python warning (``UserWarning: ...``) or any stderr output in a cell's output, a table
   cell that pandas cut at its ``display.max_colwidth`` (49 characters ending in ``...``: a key, a
   module path or an error message with its end missing), a plotting object's repr left as a cell's
   result (``<Axes: ...>``, ``<matplotlib.lines.Line2D at 0x...>``: a cell that ends on a plotting
   call instead of ``plt.show()``), a whole torch module's repr as a cell's value (a cell that ends on
   ``model.eval()``), more than 12 lines of printed ``transformers.Trainer`` log (the log a page
   should plot), an output line of more than 600 characters (an object's repr printed whole, such as
   a cell ending on a call that returns a training history), and ``nan`` in the prose (a number that
   does not exist in this profile, glued as a float).
   The site's CSS must give the text a font stack with CJK fallbacks (the Chinese terms).
5. ``--render`` (default: when Chromium is installed; always under CI, ``CI=true``, where a
   missing browser fails the check instead of skipping it): headless Chromium, with its network
   features off, loads each page with math or widgets from ``file://`` and the rendered DOM
   must contain MathJax output (``mjx-container``) and live widgets (``widget-...`` views); no inline
   formula may run past the text column in a desktop window (a formula cannot wrap; one in a box that
   scrolls sideways, such as a wide table, can be scrolled to); and
   Chinese text, in the site's font stack, must render differently from unassigned code points
   (identical screenshots mean every CJK glyph is an empty box: no CJK font reached).
6. The bibliography: ``book/bibliography.html`` lists one entry per entry of the bib files that
   ``_config.yml`` names (``bibtex_bibfiles``), each with a link to the paper (arXiv or DOI); every
   citation link on any page lands on an entry of that page; no ``{cite}`` role is left as raw text.

Usage: ``python tools/check_build.py [--html _build/html] [--render auto|yes|no]``.
"""

from __future__ import annotations

import argparse
import html as html_lib  # several checks take the build folder as a parameter called html
import json
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


RAW_TABLE = re.compile(r"\|\s*:?-{3,}:?\s*\|")
# a DataFrame cell pandas cut at display.max_colwidth (default 50): max_colwidth − 4 characters of the value,
# then "...", 49 characters in all
CUT_CELL = re.compile(r"<t[dh][^>]*>([^<]*\.\.\.)</t[dh]>")
PANDAS_CUT = 49
LONG_LINE = 600  # characters: no printed message is this long; a repr of a whole object is
# the text/plain result of a cell that ends on a plotting call (a figure's own "<Figure size ...>" text never
# shows: its image does)
PLOT_REPR = re.compile(r"<(?:Axes: |Axes3D: |matplotlib\.[\w.]+ (?:at 0x|object at)|Figure size [^>]* with 0 Axes>)")
# a cell's value (not a print) that is a torch module's repr: "Name(" and then a line per child, "  (name): ...";
# a cell that ends on model.eval() / model.train() / model.to(...) shows the whole module tree
RESULT_TEXT = re.compile(r'<div class="output text_plain[^"]*">(?:<div class="highlight">)?<pre><span></span>(.*?)</pre>',
                         re.S)
MODULE_REPR = re.compile(r"\A[A-Za-z_][\w.]*\(\n(?:.*\n)*?\s+\([\w.-]+\): ")
# transformers.Trainer's log entries, one printed per logging step when the progress bar is off (PrinterCallback)
TRAINER_LOG = re.compile(r"^\{'(?:loss|eval_loss|train_runtime)': ", re.M)
TRAINER_LOG_LINES = 12  # a few show a run's course; more are the log the page should plot
WARNING = re.compile(r"\b[A-Z]\w*Warning: ")
# Python prints a missing float as "nan"; the word NaN in a sentence about NaN values is prose, not a leak.
NAN = re.compile(r"(?<![\w.\-])nan(?![\w])")
CJK = re.compile(r"[\u4e00-\u9fff]")
BIB_PAGE = "book/bibliography.html"
RAW_CITE = re.compile(r"\{cite(?::\w+)?\}`")
BIB_ENTRY = re.compile(r'<div class="citation" id="([^"]+)" role="doc-biblioentry">(.*?)</div>', re.S)
PAPER_LINK = re.compile(r'href="https://(arxiv\.org/abs/|doi\.org/)')
CJK_FAMILIES = ("Noto Sans CJK", "Noto Sans SC", "Source Han Sans", "PingFang", "Microsoft YaHei", "WenQuanYi",
                "Hiragino Sans GB")


class _Reader(HTMLParser):
    """The text a reader sees, split into prose (outside code and cell outputs) and cell output text;
    plus whether a cell output carries stderr."""

    VOID = {"br", "img", "hr", "meta", "link", "input", "source", "area", "base", "col", "embed", "param", "track",
            "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, set[str]]] = []
        self.prose: list[str] = []
        self.output: list[str] = []
        self.stderr = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            return
        classes = set((dict(attrs).get("class") or "").split())
        self.stack.append((tag, classes))
        if "stderr" in classes and self._inside("cell_output"):
            self.stderr += 1

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def _inside(self, cls: str) -> bool:
        return any(cls in classes for _, classes in self.stack)

    def handle_data(self, data: str) -> None:
        tags = {t for t, _ in self.stack}
        if tags & {"script", "style", "head", "title", "nav", "header", "footer"} or self._inside("cell_input"):
            return
        if self._inside("cell_output"):
            self.output.append(data)
        elif not (tags & {"pre", "code", "kbd", "samp"}) and not self._inside("highlight") \
                and not self._inside("math") and not self._inside("MathJax_Preview"):
            self.prose.append(data)


def _read(page: Path) -> str:
    return page.read_text(encoding="utf-8", errors="replace")


def check_reader_view(page: Path, rel: str, text: str | None = None) -> list[str]:
    """Check 4 on one page (``text``: the page, when already read): raw markdown tables, leaked warnings and
    stderr, table cells cut short, plotting reprs, a whole module as a cell's value, a printed
    Trainer log, overlong output lines, ``nan`` in the prose."""
    page_html = _read(page) if text is None else text
    reader = _Reader()
    reader.feed(page_html)
    prose, output = "".join(reader.prose), "".join(reader.output)
    problems = []
    for where, text in (("prose", prose), ("a cell output", output)):
        m = RAW_TABLE.search(text)
        if m:
            problems.append(f"{rel}: a raw markdown table in {where}: {text[max(0, m.start() - 60):m.end() + 20]!r} "
                            "(show a DataFrame, or write a MyST table in markdown)")
    for cut in (html_lib.unescape(m.group(1)) for m in CUT_CELL.finditer(page_html)):
        if len(cut) == PANDAS_CUT:
            problems.append(f"{rel}: a table cell cut short by pandas: {cut!r} (display it whole: "
                            "pd.option_context('display.max_colwidth', None), or a Styler)")
    m = PLOT_REPR.search(output)
    if m:
        problems.append(f"{rel}: a plotting object's repr in a cell output: {output[m.start():m.start() + 100]!r} "
                        "(end the cell with plt.show())")
    for m in RESULT_TEXT.finditer(page_html):
        value = html_lib.unescape(re.sub(r"<[^>]+>", "", m.group(1)))
        if MODULE_REPR.match(value):
            problems.append(f"{rel}: a cell's value is a whole module's repr: {value[:80]!r}... (a cell that ends on "
                            "model.eval(), .train() or .to(): end it with ';', or print the part that matters)")
    logged = len(TRAINER_LOG.findall(output))
    if logged > TRAINER_LOG_LINES:
        problems.append(f"{rel}: {logged} lines of Trainer log in the cell outputs (remove its PrinterCallback and "
                        "plot trainer.state.log_history, or raise logging_steps)")
    longest = max(output.splitlines(), key=len, default="")
    if len(longest) > LONG_LINE:
        problems.append(f"{rel}: a cell output line of {len(longest)} characters: {longest[:100]!r}... (an object's "
                        "repr printed whole? assign the result, or print what matters of it)")
    m = WARNING.search(output)
    if m:
        problems.append(f"{rel}: a warning leaks into a cell output: {output[m.start():m.start() + 120]!r}")
    if reader.stderr:
        problems.append(f"{rel}: {reader.stderr} cell output(s) on stderr (warnings, progress bars)")
    m = RAW_CITE.search(prose)
    if m:
        problems.append(f"{rel}: a citation left as raw text: {prose[max(0, m.start() - 60):m.end() + 40]!r} "
                        "(a {cite} role inside a glued string or a code cell is not rendered; cite in markdown)")
    for m in NAN.finditer(prose):
        problems.append(f"{rel}: 'nan' in the prose: {prose[max(0, m.start() - 80):m.end() + 20]!r} "
                        "(glue a sentence that says the number does not exist in this profile)")
    return problems


def check_bibliography(html: Path, pages: list[Page] | None = None) -> list[str]:
    """Check 6: the bibliography page lists every bib entry with a link to the paper, and every citation
    link in the book lands on one of its entries (``pages``: the site, when already read)."""
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    bibfiles = cfg.get("bibtex_bibfiles") or []
    if not bibfiles:
        return ["_config.yml names no bibtex_bibfiles (the book's bibliography, book/references.bib)"]
    n_bib = sum(len(re.findall(r"^\s*@(?!comment|string|preamble)\w+\s*\{", (ROOT / f).read_text(encoding="utf-8"),
                               flags=re.M | re.I)) for f in bibfiles)
    page = html / BIB_PAGE
    if not page.is_file():
        return [f"{BIB_PAGE} missing (the Bibliography page in _toc.yml)"]
    if pages is None:
        pages = read_pages(html)
    entries = dict(BIB_ENTRY.findall(next(p.text for p in pages if p.rel == BIB_PAGE)))
    problems = []
    if len(entries) != n_bib:
        problems.append(f"{BIB_PAGE} lists {len(entries)} entries, the bib files {bibfiles} hold {n_bib} "
                        "(an entry no page cites is left out: cite it or drop it)")
    bare = [i for i, body in entries.items() if not PAPER_LINK.search(body)]
    if bare:
        problems.append(f"{BIB_PAGE}: entries {bare} link to no paper (give each an eprint or a doi)")
    for other in pages:
        for href in re.findall(r'<a class="reference internal" href="([^"]*#[^"]+)"', other.text):
            target, _, frag = href.partition("#")
            if (other.path.parent / target).resolve() == page.resolve() and frag.startswith("id") \
                    and frag not in entries:
                problems.append(f"{other.rel}: citation link {href!r} lands on no entry of {BIB_PAGE}")
    return problems


def check_font_stack(html: Path) -> list[str]:
    """The site's own stylesheet names CJK fallback fonts (the Chinese terms need one)."""
    css = html / "_static" / "peftlab.css"
    if not css.is_file():
        return [f"{css.relative_to(html)} missing (html_css_files in _config.yml)"]
    text = css.read_text(encoding="utf-8")
    if not any(f in text for f in CJK_FAMILIES):
        return [f"_static/peftlab.css names no CJK font in its font stack (one of {CJK_FAMILIES})"]
    return []


def check_cjk_render(html: Path, browser: str) -> list[str]:
    """Screenshot Chinese text and unassigned code points in the site's font stack: equal images mean
    every CJK glyph was drawn as an empty box (no CJK font reachable)."""
    css = (html / "_static" / "peftlab.css").resolve().as_uri()
    shots = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("cjk", "中文术语低秩适配"), ("unassigned", "".join(chr(0xF0000 + i) for i in range(8)))):
            page = Path(tmp) / f"{name}.html"
            page.write_text(f'<!doctype html><html><head><meta charset="utf-8"><link rel="stylesheet" href="{css}">'
                            f'</head><body style="margin:0;background:#fff"><p style="font-size:40px">{text}</p>'
                            "</body></html>", encoding="utf-8")
            png = Path(tmp) / f"{name}.png"
            cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={tmp}/profile-{name}", "--window-size=480,80", f"--screenshot={png}",
                   page.as_uri()]
            try:
                subprocess.run(cmd, capture_output=True, timeout=120)
            except subprocess.TimeoutExpired:
                return ["CJK render check: Chromium timed out"]
            if not png.is_file():
                return ["CJK render check: Chromium wrote no screenshot"]
            shots.append(png.read_bytes())
    if shots[0] == shots[1]:
        return ["Chinese text renders as empty boxes: no CJK font reaches the site's font stack "
                "(Debian: apt-get install -y fonts-noto-cjk)"]
    print("check_build: rendered CJK text: glyphs present")
    return []


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


class Page:
    """One rendered page, read and parsed once for every check: ``path``, ``rel`` (to the site's root),
    ``text`` and ``assets`` (what it loads, whether it has math or widgets, its Colab links)."""

    def __init__(self, html: Path, path: Path) -> None:
        self.path = path
        self.rel = path.relative_to(html).as_posix()
        self.text = _read(path)
        self.assets = _Assets()
        self.assets.feed(self.text)


def read_pages(html: Path) -> list[Page]:
    """Every page of the site, each read once."""
    return [Page(html, p) for p in sorted(html.rglob("*.html"))]


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


def check_static(html: Path, pages: list[Page]) -> list[str]:
    """Run checks 1-4 and 6 on the site's ``pages`` (:func:`read_pages`)."""
    problems: list[str] = []
    for target in (MATHJAX, EMBED):
        if not (html / target).is_file():
            problems.append(f"{target} missing from {html} (run `python tools/fetch_js.py`)")
    if not pages:
        return [f"no HTML pages under {html}; build the book first"]
    for p in pages:
        page, rel, text, parser = p.path, p.rel, p.text, p.assets
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
        problems += check_reader_view(page, rel, text)
    problems += check_font_stack(html)
    problems += check_bibliography(html, pages)

    slug, branch = _repo_slug()
    by_rel = {p.rel: p for p in pages}
    for page_rel, nb in _notebook_pages().items():
        if page_rel not in by_rel:
            problems.append(f"{page_rel} missing (notebook {nb} is in _toc.yml)")
            continue
        colab = by_rel[page_rel].assets.colab
        want = f"https://colab.research.google.com/github/{slug}/blob/{branch}/{nb}"
        if want not in colab:
            problems.append(f"{page_rel} has no Colab link to {want} (found {colab})")
    return problems


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Injected into a copy of each page that check 5 renders: once MathJax has typeset, the TeX of every inline
# formula whose right edge passes the text column's (a formula cannot wrap: the line runs off the page) and that
# no sideways-scrolling box (a wide table) holds, written into the DOM for --dump-dom to carry out.
MEASURE = """<script>
window.addEventListener("load", () => {
  const measure = () => {
    const column = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
    const right = column.getBoundingClientRect().right;
    const over = [];
    const doc = window.MathJax && MathJax.startup && MathJax.startup.document;
    for (const item of (doc && doc.math) || []) {
      if (item.display || !item.typesetRoot) continue;
      let scrolls = false;  // a formula in a box that scrolls sideways (a wide table) can be scrolled to
      for (let e = item.typesetRoot.parentElement; e && e !== column; e = e.parentElement) {
        if (["auto", "scroll"].includes(getComputedStyle(e).overflowX)) { scrolls = true; break; }
      }
      if (scrolls) continue;
      const box = item.typesetRoot.getBoundingClientRect();
      if (box.width > 0 && box.right > right + 2) over.push(item.math);
    }
    document.body.setAttribute("data-overflow", JSON.stringify(over));
  };
  const ready = window.MathJax && MathJax.startup && MathJax.startup.promise;
  ready ? ready.then(() => setTimeout(measure, 50)) : setTimeout(measure, 500);
});
</script>"""
OVERFLOW = re.compile(r'data-overflow="([^"]*)"')
#: the window check 5 renders in: a desktop browser's (the text column then is its full width)
WINDOW = "1300,900"


def check_render(html: Path, pages: list[Page], browser: str) -> list[str]:
    """Run check 5 with headless Chromium and no network features, on the ``pages`` with math or widgets."""
    problems = []
    for p in pages:
        page, rel, parser = p.path, p.rel, p.assets
        if not (parser.has_math or parser.has_widget_view):
            continue
        copy = page.with_name(f".render-{page.name}")  # beside the page, so its relative links resolve
        text = p.text if "</body>" in p.text else p.text + "</body>"
        copy.write_text(text.replace("</body>", MEASURE + "</body>", 1), encoding="utf-8")
        try:
            with tempfile.TemporaryDirectory() as profile:
                cmd = [
                    browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-quic", f"--user-data-dir={profile}", f"--window-size={WINDOW}",
                    "--virtual-time-budget=8000", "--dump-dom", copy.resolve().as_uri(),
                ]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                except subprocess.TimeoutExpired:
                    problems.append(f"{rel}: Chromium timed out")
                    continue
        finally:
            copy.unlink(missing_ok=True)
        dom = out.stdout
        if not dom:
            problems.append(f"{rel}: Chromium returned no DOM ({out.stderr.strip()[-300:]})")
            continue
        if parser.has_math and "<mjx-container" not in dom:
            problems.append(f"{rel}: math did not render (no mjx-container in the DOM)")
        if parser.has_widget_view and not re.search(r'class="[^"]*\bwidget-', dom):
            problems.append(f"{rel}: widgets did not render (no widget views in the DOM)")
        m = OVERFLOW.search(dom)
        for tex in json.loads(html_lib.unescape(m.group(1))) if m else []:
            problems.append(f"{rel}: inline math runs past the text column: ${tex}$ (make it a display equation, "
                            "or split it)")
        print(f"check_build: rendered {rel}: math={parser.has_math} widgets={parser.has_widget_view}")
    if any(CJK.search(p.text) for p in pages):
        problems += check_cjk_render(html, browser)
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    ap.add_argument("--render", choices=("auto", "yes", "no"), default="auto")
    args = ap.parse_args()
    if args.render == "auto" and os.environ.get("CI", "").lower() in ("true", "1"):
        args.render = "yes"  # CI must see the render check run, never a skip

    pages = read_pages(args.html)
    problems = check_static(args.html, pages)
    browser = _chromium()
    if args.render == "yes" and browser is None:
        problems.append("--render yes, but no Chromium found (Debian: apt-get install -y chromium)")
    elif args.render != "no" and browser is not None:
        problems += check_render(args.html, pages, browser)
    elif args.render == "auto":
        print("check_build: Chromium not installed; render check skipped")

    if problems:
        print("check_build: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print(f"check_build: {len(pages)} pages OK (offline assets, local MathJax and widgets, Colab links, no raw tables, "
          "cut cells, plot reprs, module trees, Trainer logs, overlong output lines, warnings or nan on a page, a "
          "bibliography that lists every entry)")


if __name__ == "__main__":
    main()
