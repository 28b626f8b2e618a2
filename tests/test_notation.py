"""One notation for the whole book (book/notation.md): the common drifts never reach a chapter's text.

Each rule is (what drifted, regex, what to write instead). The text checked is every markdown cell of
book/*.ipynb and every book/*.md page except the notation page's own list of rejected forms. A second
test keeps the book's prose free of references a reader cannot follow (our internal notes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
REJECTED_SECTION = "## What `tests/test_notation.py` rejects"

DRIFTS = [
    ("pretrained parameters as θ₀", r"\\theta_\{?0\}?(?![\d])|θ₀|θ_0", r"$\theta_\text{pre}$"),
    ("pretrained/fine-tuned parameters in DARE's capitals", r"\\theta_\\(?:text|mathrm)\{(?:PRE|SFT)\}|θ_(?:PRE|SFT)",
     r"$\theta_\text{pre}$ and $\theta_t$"),
    ("rsLoRA's scaling as γ_r", r"\\gamma_r|γ_r", "$s$ (the scaling, α/r or α/√r)"),
    ("density as d or ρ", r"density \$(?:d|\\rho)\$|density \(\$(?:d|\\rho)\$\)", "density $k$"),
    ("a bare in × out shape", r"(?<![\w{])(?:out|in) (?:×|\\times) (?:in|out)(?![\w}])",
     r"$d_\text{out} \times d_\text{in}$"),
    ("完全匹配 for exact match", r"完全匹配", "精确匹配"),
    ("LoHa factors as B₁A₁", r"B_1\s*A_1|B_1A_1|B_2\s*A_2", r"$W_{1a}W_{1b}$, $W_{2a}W_{2b}$"),
    ("LoKr factors as C ⊗ D", r"(?<!\()C\s*\\otimes\s*D(?!\))", r"$W_1 \otimes W_2$"),
]

INTERNAL = re.compile(r"paper-claims|peft-behaviour|STYLE\.md|\.\./shared|reference prototype|reference miniature"
                      r"|reference recipe|the lab notes|the reference's", re.IGNORECASE)


def _texts() -> list[tuple[str, str]]:
    out = []
    for path in sorted(BOOK.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "markdown":
                out.append((f"{path.name} cell {i}", "".join(cell["source"])))
    for path in sorted(BOOK.glob("*.md")):
        text = path.read_text()
        if path.name == "notation.md":
            text = text.split(REJECTED_SECTION)[0]
        out.append((path.name, text))
    return out


def _code_texts() -> list[tuple[str, str]]:
    out = []
    for path in sorted(BOOK.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                out.append((f"{path.name} cell {i}", "".join(cell["source"])))
    return out


@pytest.mark.parametrize("name, pattern, instead", DRIFTS, ids=[d[0] for d in DRIFTS])
def test_no_notation_drift(name: str, pattern: str, instead: str) -> None:
    rx = re.compile(pattern)
    hits = [f"{where}: …{text[max(0, m.start() - 30):m.end() + 30]!r}…"
            for where, text in _texts() for m in rx.finditer(text)]
    assert not hits, f"{name}: write {instead} (book/notation.md). Found:\n" + "\n".join(hits)


def test_notation_page_lists_each_term_once() -> None:
    text = (BOOK / "notation.md").read_text().split(REJECTED_SECTION)[0]
    terms = re.search(r"## Terms.*?\n(\|.*?)(?:\n\n|\Z)", text, re.S)
    assert terms, "book/notation.md needs its Terms table"
    rows = [r.split("|")[1:3] for r in terms.group(1).splitlines()[2:]]
    english = [e.strip() for e, _ in rows]
    chinese = [c.strip() for _, c in rows]
    assert len(set(english)) == len(english) and len(set(chinese)) == len(chinese), rows


def test_chapters_use_the_notation_pages_chinese_terms() -> None:
    """Where a chapter glosses a term of the Terms table ("exact match (精确匹配)"), it uses that term."""
    text = (BOOK / "notation.md").read_text().split(REJECTED_SECTION)[0]
    table = re.search(r"## Terms.*?\n(\|.*?)(?:\n\n|\Z)", text, re.S).group(1)
    terms = {e.strip().lower(): c.strip() for e, c in (r.split("|")[1:3] for r in table.splitlines()[2:])}
    bad = []
    for where, body in _texts():
        for english, chinese in terms.items():
            for m in re.finditer(rf"\b{re.escape(english)}\*{{0,2}} \(([^)\s,，;；]+)", body, re.IGNORECASE):
                gloss = m.group(1)
                # a compound term ("disjoint merge (不相交合并)") contains the term itself
                if re.search(r"[\u4e00-\u9fff]", gloss) and chinese not in gloss:
                    bad.append(f"{where}: {english!r} glossed {gloss!r}, the notation page says {chinese!r}")
    assert not bad, "\n".join(bad)


def test_prose_cites_no_internal_notes() -> None:
    hits = [f"{where}: {m.group(0)!r}" for where, text in _texts() + _code_texts() for m in INTERNAL.finditer(text)]
    assert not hits, "the book cites papers and its own pages, never our internal notes:\n" + "\n".join(hits)
