"""tools/check_build.py sees what a reader would: raw markdown tables, leaked warnings, nan in prose, missing CJK."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_build", ROOT / "tools" / "check_build.py")
check_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_build)

CLEAN = """<html><head><title>t</title></head><body><article class="bd-article">
<p>LoRA trains 1,024 parameters (秩 r = 4).</p>
<table><tr><th>a</th><td>1</td></tr></table>
<div class="cell docutils container"><div class="cell_input docutils container"><div class="highlight"><pre>
rows = ["| --- |"]  # code may hold anything
x = float("nan")
</pre></div></div>
<div class="cell_output docutils container"><div class="output stream highlight-myst-ansi notranslate">
<div class="highlight"><pre>score 0.93</pre></div></div></div></div>
</article></body></html>"""


def _page(tmp_path: Path, body: str) -> list[str]:
    page = tmp_path / "page.html"
    page.write_text(body, encoding="utf-8")
    return check_build.check_reader_view(page, "page.html")


def test_a_clean_page_passes(tmp_path: Path) -> None:
    assert _page(tmp_path, CLEAN) == []


def test_raw_markdown_table_is_caught(tmp_path: Path) -> None:
    raw = CLEAN.replace("<p>LoRA", "<p>| task | score |\n| --- | --- |\n| sort | 1 |</p><p>LoRA")
    problems = _page(tmp_path, raw)
    assert len(problems) == 1 and "raw markdown table in prose" in problems[0]
    in_output = CLEAN.replace("score 0.93", "| task | score |\n|---|---|")
    assert "raw markdown table in a cell output" in _page(tmp_path, in_output)[0]


def test_leaked_warning_and_stderr_are_caught(tmp_path: Path) -> None:
    leaked = CLEAN.replace("score 0.93", "/x/peft.py:3: UserWarning: merging into a quantised base")
    assert any("warning leaks" in p for p in _page(tmp_path, leaked))
    stderr = CLEAN.replace('class="output stream', 'class="output stderr')
    assert any("stderr" in p for p in _page(tmp_path, stderr))


def test_a_cell_cut_by_pandas_is_caught(tmp_path: Path) -> None:
    key = "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight"
    cut = pd.DataFrame({"key": [key]})._repr_html_().split("<td>")[1].split("</td>")[0]  # as a notebook shows it
    assert cut == key[:46] + "..."
    problems = _page(tmp_path, CLEAN.replace("<td>1</td>", f"<td>{cut}</td>"))
    assert len(problems) == 1 and "cut short by pandas" in problems[0] and "layers.0.self_a" in problems[0]
    assert _page(tmp_path, CLEAN.replace("<td>1</td>", f"<td>{key}</td>")) == []  # shown whole
    assert _page(tmp_path, CLEAN.replace("<td>1</td>", "<td>to be continued...</td>")) == []  # short: prose
    quoted = "RuntimeError: shape &#39;[1, 2, 4, 16]&#39; is invalid for input of size 96"
    cut_quoted = "RuntimeError: shape &#39;[1, 2, 4, 16]&#39; is invalid..."  # 49 characters once unescaped
    assert _page(tmp_path, CLEAN.replace("<td>1</td>", f"<td>{quoted}</td>")) == []
    assert "cut short" in _page(tmp_path, CLEAN.replace("<td>1</td>", f'<td class="x">{cut_quoted}</td>'))[0]


def test_a_plotting_repr_left_as_a_result_is_caught(tmp_path: Path) -> None:
    for leak in ("&lt;Axes: title={'center': 'update size'}, xlabel='rank r'&gt;",
                 "[&lt;matplotlib.lines.Line2D at 0x7f3a2c1d0&gt;]"):
        problems = _page(tmp_path, CLEAN.replace("score 0.93", leak))
        assert len(problems) == 1 and "plotting object's repr" in problems[0], leak
    # prose may name them, and an Axes in words is no leak
    assert _page(tmp_path, CLEAN.replace("score 0.93", "score 0.93 on 2 Axes")) == []


def test_an_object_printed_whole_is_caught(tmp_path: Path) -> None:
    steps, losses = ", ".join(map(str, range(1, 51))), ", ".join(["2.4570586681365967"] * 40)
    history = f"History(steps=[{steps}], loss=[{losses}])"
    problems = _page(tmp_path, CLEAN.replace("score 0.93", history))
    assert len(problems) == 1 and f"line of {len(history)} characters" in problems[0]
    message = "ValueError: the adapter does not fit this model: " + "x" * 400  # a long message is still a message
    assert _page(tmp_path, CLEAN.replace("score 0.93", message)) == []
    many = "\n".join(["score 0.93"] * 200)  # many short lines are not one long one
    assert _page(tmp_path, CLEAN.replace("score 0.93", many)) == []


def test_a_whole_module_left_as_a_cells_value_is_caught(tmp_path: Path) -> None:
    """A cell that ends on ``model.eval()`` shows the whole module tree as its value; a printed layer, or another
    value that opens with a bracket (a Dataset, a tensor), is no leak."""
    import torch

    tree = repr(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())).replace("<", "&lt;")

    def value(text: str) -> str:
        return CLEAN.replace('<div class="output stream highlight-myst-ansi notranslate">\n<div class="highlight"><pre>'
                             'score 0.93</pre>',
                             '<div class="output text_plain highlight-myst-ansi notranslate"><div class="highlight">'
                             f'<pre><span></span>{text}</pre>')
    assert value("x") != CLEAN
    problems = _page(tmp_path, value(tree))
    assert len(problems) == 1 and "a whole module's repr" in problems[0] and "Sequential(" in problems[0]
    assert _page(tmp_path, CLEAN.replace("score 0.93", tree)) == []  # printed on purpose (a stream)
    for other in ("Dataset({\n    features: ['task'],\n    num_rows: 2\n})", "tensor([[1., 2.],\n        [3., 4.]])"):
        assert _page(tmp_path, value(other)) == [], other


def test_a_printed_trainer_log_is_caught(tmp_path: Path) -> None:
    """A Trainer without a progress bar prints one dict per logging step: a few lines show a run's course, a page of
    them is the log the page should plot."""
    def log(n: int) -> str:
        return "\n".join(f"{{&#39;loss&#39;: &#39;{2.0 / (i + 1):.4g}&#39;, &#39;epoch&#39;: &#39;{i}&#39;}}" for i in range(n))
    problems = _page(tmp_path, CLEAN.replace("score 0.93", log(30)))
    assert len(problems) == 1 and "30 lines of Trainer log" in problems[0]
    assert _page(tmp_path, CLEAN.replace("score 0.93", log(4))) == []


def test_nan_in_prose_is_caught_but_not_in_code_or_words(tmp_path: Path) -> None:
    problems = _page(tmp_path, CLEAN.replace("1,024 parameters", "nan parameters"))
    assert len(problems) == 1 and "'nan' in the prose" in problems[0]
    assert _page(tmp_path, CLEAN.replace("1,024 parameters", "nanoseconds and finance")) == []
    assert _page(tmp_path, CLEAN.replace("1,024 parameters", "refuses a NaN or an infinite value")) == []  # prose


def test_font_stack_must_name_a_cjk_font(tmp_path: Path) -> None:
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "peftlab.css").write_text("body { font-family: sans-serif; }")
    assert "names no CJK font" in check_build.check_font_stack(tmp_path)[0]
    shutil.copy(ROOT / "book" / "_static" / "peftlab.css", tmp_path / "_static" / "peftlab.css")
    assert check_build.check_font_stack(tmp_path) == []


@pytest.mark.skipif(shutil.which("chromium") is None or shutil.which("fc-list") is None,
                    reason="needs Chromium and fontconfig (CI installs both)")
def test_cjk_render_check_sees_missing_fonts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "_static").mkdir()
    shutil.copy(ROOT / "book" / "_static" / "peftlab.css", tmp_path / "_static" / "peftlab.css")
    browser = shutil.which("chromium")
    # a fontconfig that knows one Latin font only: Chinese must come out as empty boxes
    conf = tmp_path / "fonts.conf"
    latin = next((d for d in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")
                  if Path(d).is_dir()), None)
    if latin is None:
        pytest.skip("no Latin font folder to build a CJK-less fontconfig from")
    conf.write_text(f'<?xml version="1.0"?><fontconfig><dir>{latin}</dir><cachedir>{tmp_path}/fc</cachedir>'
                    "</fontconfig>")
    monkeypatch.setenv("FONTCONFIG_FILE", str(conf))
    assert "empty boxes" in check_build.check_cjk_render(tmp_path, browser)[0]
    monkeypatch.delenv("FONTCONFIG_FILE")
    has_cjk = check_build.subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout.strip()
    if has_cjk:
        assert check_build.check_cjk_render(tmp_path, browser) == []


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (CI installs it)")
def test_render_check_sees_inline_math_run_off_the_column(tmp_path: Path) -> None:
    """A formula cannot wrap: one too long for the text column runs off the page, unless a box that scrolls
    sideways (a wide table) holds it. Rendered by headless Chromium with the book's own MathJax."""
    mathjax = ROOT / "_vendor" / "site" / "_static" / "vendor" / "mathjax"
    if not mathjax.is_dir():
        pytest.skip("MathJax is not fetched yet: make setup (which make test runs first) puts it in _vendor/")
    vendor = tmp_path / "_static" / "vendor"
    vendor.mkdir(parents=True)
    (vendor / "mathjax").symlink_to(mathjax)
    long = r"R^\top R = (I+Q)^{-\top}(I-Q)^\top(I-Q)(I+Q)^{-1} = (I-Q)^{-1}(I+Q)(I-Q)(I+Q)^{-1} = I"
    page = tmp_path / "page.html"
    page.write_text(
        '<html><head><script defer src="_static/vendor/mathjax/tex-mml-chtml.js"></script></head><body>'
        '<article class="bd-article" style="width: 320px">'
        f'<p>short <span class="math notranslate nohighlight">\\(BA\\)</span> and long '
        f'<span class="math notranslate nohighlight">\\({long}\\)</span> end.</p>'
        f'<div style="overflow-x: auto"><table><tr><td style="white-space: nowrap">'
        f'<span class="math notranslate nohighlight">\\(W_0 + {long}\\)</span></td></tr></table></div>'
        "</article></body></html>", encoding="utf-8")
    problems = check_build.check_render(tmp_path, [check_build.Page(tmp_path, page)], shutil.which("chromium"))
    over = [p for p in problems if "runs past the text column" in p]
    assert len(over) == 1 and "(I+Q)^{-1} = I$" in over[0] and "W_0" not in over[0], problems
    assert not list(tmp_path.glob(".render-*"))  # the measuring copy is gone


def test_raw_cite_role_in_prose_is_caught(tmp_path: Path) -> None:
    leaked = CLEAN.replace("1,024 parameters", "1,024 parameters ({cite}`hu2021lora`)")
    problems = _page(tmp_path, leaked)
    assert len(problems) == 1 and "citation left as raw text" in problems[0]


def _bib_site(tmp_path: Path, n_entries: int, link: str = "https://arxiv.org/abs/2106.09685",
              cite_href: str = "bibliography.html#id1") -> Path:
    html = tmp_path / "html"
    (html / "book").mkdir(parents=True)
    entries = "".join(f'<div class="citation" id="id{i}" role="doc-biblioentry">\n<span class="label">[X{i}]</span>'
                      f'<p>A. Author. A title. <a class="reference external" href="{link}">arXiv</a>.</p>\n</div>\n'
                      for i in range(1, n_entries + 1))
    (html / check_build.BIB_PAGE).write_text(f"<html><body>{entries}</body></html>", encoding="utf-8")
    (html / "book" / "lora.html").write_text(f'<p>LoRA <a class="reference internal" href="{cite_href}">X1</a></p>',
                                             encoding="utf-8")
    return html


def test_bibliography_page_lists_every_entry_and_citations_land(tmp_path: Path) -> None:
    n_bib = len(check_build.re.findall(r"^@\w+\{", (ROOT / "book" / "references.bib").read_text(), flags=check_build.re.M))
    assert n_bib > 0
    assert check_build.check_bibliography(_bib_site(tmp_path / "ok", n_bib)) == []
    short = check_build.check_bibliography(_bib_site(tmp_path / "short", n_bib - 1))
    assert len(short) == 1 and f"lists {n_bib - 1} entries" in short[0]
    unlinked = check_build.check_bibliography(_bib_site(tmp_path / "nolink", n_bib, link="https://example.org"))
    assert len(unlinked) == 1 and "link to no paper" in unlinked[0]
    stale = check_build.check_bibliography(_bib_site(tmp_path / "stale", n_bib, cite_href=f"bibliography.html#id{n_bib + 1}"))
    assert len(stale) == 1 and "lands on no entry" in stale[0]


def test_every_page_is_read_once_for_all_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_pages reads each page once; the static checks, the bibliography, the Colab links and the render check
    all work on that read (a page with math goes to the browser without being read again)."""
    html = _bib_site(tmp_path, 1)
    (html / "book" / "lora.html").write_text('<p>LoRA 秩 <span class="math">x</span></p>', encoding="utf-8")
    reads: list[str] = []
    real = check_build._read
    monkeypatch.setattr(check_build, "_read", lambda page: reads.append(page.name) or real(page))

    class Dom:
        stdout, stderr = "<mjx-container></mjx-container>", ""

    browsed: list[str] = []
    monkeypatch.setattr(check_build.subprocess, "run", lambda cmd, **k: browsed.append(Path(cmd[-1]).name) or Dom())
    monkeypatch.setattr(check_build, "check_cjk_render", lambda html, browser: ["cjk checked"])
    pages = check_build.read_pages(html)
    problems = check_build.check_static(html, pages)
    rendered = check_build.check_render(html, pages, "chromium")
    assert sorted(reads) == ["bibliography.html", "lora.html"]
    assert any("does not load the local" in p for p in problems)  # the checks ran on what was read
    # math rendered (from a copy of the page carrying the measuring script), Chinese seen, nothing re-read
    assert browsed == [".render-lora.html"] and rendered == ["cjk checked"]
