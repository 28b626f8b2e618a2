"""The book's one bibliography (book/references.bib, rendered on book/bibliography.md) and the pages that cite it.

- every key a page cites ({cite}`key`, also {cite:p}, {cite:t}, several keys per role) is in the bib;
- every entry has an arXiv id (``eprint``) or a DOI, and every entry is cited on some page of the book;
- an arXiv id named in a page's prose is cited on that page, with the entry that carries that id;
- every method the library implements is taught by a chapter (the ``Explained in:`` line of its code) that
  cites the method's paper: the map below is method or code object -> paper, kept small; a new method fails
  here until its paper is in the bib and its chapter cites it;
- the bibliography page is in _toc.yml, holds the ``{bibliography}`` directive, and _config.yml names the bib.

Explained in: book/bibliography.md
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from pybtex.database import parse_file

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("prepare_exec", ROOT / "tools" / "prepare_exec.py")
prepare_exec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_exec)
BIB = ROOT / "book" / "references.bib"
BIB_PAGE = "book/bibliography"
CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]*)`")
ARXIV_IN_PROSE = re.compile(r"arXiv[:\s]+(\d{4}\.\d{4,5})")
ARXIV_ID = re.compile(r"^\d{4}\.\d{4,5}$")
EXPLAINED = re.compile(r"Explained in:\s*book/(\w+)\.(?:ipynb|md)")

# registered peft_type -> the paper that introduced the method (its chapter: the config class's "Explained in")
METHOD_PAPERS = {
    "LORA": "hu2021lora",
    "LOHA": "hyeonwoo2021fedpara",
    "LOKR": "yeh2023lycoris",
    "OFT": "qiu2023oft",
    "BOFT": "liu2023boft",
    "IA3": "liu2022ia3",
    "ADAPTION_PROMPT": "zhang2023llamaadapter",
    "XLORA": "buehler2024xlora",
    "ADALORA": "zhang2023adalora",
}
# a library object that implements a paper's idea -> that paper (its chapter: the object's "Explained in")
CODE_PAPERS = {
    "peftlab.tuners.lora.dora": "liu2024dora",
    "peftlab.tuners.lora.config:LoftQConfig": "li2023loftq",
    "peftlab.quantization.nf4": "dettmers2023qlora",
    "peftlab.optimizers.loraplus:create_loraplus_optimizer": "hayou2024loraplus",
    "peftlab.merging.prune:calculate_majority_sign_mask": "yadav2023ties",
    "peftlab.merging.prune:random_pruning": "yu2023dare",
}
# LoraConfig switches taught beside LoftQ (same chapter): init_lora_weights values and the rsLoRA flag
LORA_SWITCH_PAPERS = {"pissa": "meng2024pissa", "olora": "buyukakyuz2024olora", "use_rslora": "kalajdzievski2023rslora"}


def _toc_pages() -> list[str]:
    """Every page of the book, as ``book/<name>`` without suffix, in _toc.yml order."""
    return prepare_exec.toc_entries(ROOT)


def _prose(page: str) -> str:
    """The markdown a reader sees on a page: a .md page whole, a notebook's markdown cells."""
    nb, md = ROOT / f"{page}.ipynb", ROOT / f"{page}.md"
    if nb.is_file():
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return md.read_text(encoding="utf-8")


def _cited(text: str) -> set[str]:
    return {key.strip() for group in CITE.findall(text) for key in group.split(",") if key.strip()}


PAGES = _toc_pages()
ENTRIES = parse_file(str(BIB), bib_format="bibtex").entries
CITED = {page: _cited(_prose(page)) for page in PAGES}


def _chapter_of(obj: object) -> str:
    m = EXPLAINED.search(obj.__doc__ or "")
    assert m, f"{obj!r} has no 'Explained in: book/<chapter>.ipynb' line in its docstring"
    return f"book/{m.group(1)}"


def _import(path: str) -> object:
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def test_config_names_the_bib_and_the_toc_has_the_page():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert [ROOT / p for p in cfg.get("bibtex_bibfiles", [])] == [BIB], \
        f"_config.yml bibtex_bibfiles={cfg.get('bibtex_bibfiles')!r}; want ['book/references.bib'] (one bib)"
    assert BIB_PAGE in PAGES, f"{BIB_PAGE}.md is not in _toc.yml (add it to the Reference part)"
    text = (ROOT / f"{BIB_PAGE}.md").read_text(encoding="utf-8")
    directives = re.findall(r"^(`{3,}|:{3,})\{bibliography\}", text, flags=re.M)
    assert len(directives) == 1, f"{BIB_PAGE}.md needs exactly one {{bibliography}} directive, has {len(directives)}"
    others = [p for p in PAGES if p != BIB_PAGE and "{bibliography}" in _prose(p)]
    assert not others, f"a second {{bibliography}} on {others} duplicates every citation label (one list per book)"


def test_every_cited_key_is_in_the_bib():
    unknown = {page: sorted(keys - set(ENTRIES)) for page, keys in CITED.items() if keys - set(ENTRIES)}
    assert not unknown, f"cited keys missing from {BIB.name}: {unknown}"


@pytest.mark.parametrize("key", sorted(ENTRIES))
def test_entry_has_an_id_and_is_cited(key):
    fields = {k.lower(): v for k, v in ENTRIES[key].fields.items()}
    eprint, doi = fields.get("eprint", ""), fields.get("doi", "")
    assert eprint or doi, f"{key}: no eprint (arXiv id) and no doi; a reader must be able to find the paper"
    if eprint:
        assert ARXIV_ID.match(eprint), f"{key}: eprint={eprint!r} is not an arXiv id such as 2106.09685"
        assert fields.get("archiveprefix", "").lower() == "arxiv", f"{key}: eprint without archivePrefix = {{arXiv}}"
    assert fields.get("title") and ENTRIES[key].persons.get("author"), f"{key}: needs a title and authors"
    where = [page for page, keys in CITED.items() if key in keys]
    assert where, f"{key} is in {BIB.name} but no page of the book cites it (cite it, or drop the entry)"


def test_arxiv_ids_are_unique():
    seen: dict[str, str] = {}
    for key, entry in ENTRIES.items():
        eprint = entry.fields.get("eprint")
        if eprint:
            assert eprint not in seen, f"arXiv {eprint} is in the bib twice: {seen[eprint]} and {key}"
            seen[eprint] = key


@pytest.mark.parametrize("page", PAGES)
def test_arxiv_ids_in_prose_are_cited_on_the_page(page):
    by_id = {e.fields["eprint"]: k for k, e in ENTRIES.items() if "eprint" in e.fields}
    for arxiv in sorted(set(ARXIV_IN_PROSE.findall(_prose(page)))):
        assert arxiv in by_id, f"{page} names arXiv {arxiv}, which has no entry in {BIB.name}"
        assert by_id[arxiv] in CITED[page], \
            f"{page} names arXiv {arxiv} but does not cite it: add {{cite}}`{by_id[arxiv]}` where it is named"


def test_every_method_chapter_cites_its_paper():
    from peftlab.registry import get_method, known_methods
    from peftlab.tuners.lora.config import LoftQConfig, LoraConfig
    from peftlab.tuners.lora.init import INIT_CHOICES

    unmapped = sorted(set(known_methods()) - set(METHOD_PAPERS))
    assert not unmapped, f"methods {unmapped} have no paper in METHOD_PAPERS: add the paper to {BIB.name}, " \
                         "cite it in the method's chapter and map it here"
    wanted = {(_chapter_of(get_method(m).config_class), key) for m, key in METHOD_PAPERS.items()
              if m in known_methods()}
    wanted |= {(_chapter_of(_import(path)), key) for path, key in CODE_PAPERS.items()}
    switches = {str(c).lower() for c in INIT_CHOICES} | {f.name for f in LoraConfig.__dataclass_fields__.values()}
    missing_switches = sorted(set(LORA_SWITCH_PAPERS) - switches)
    assert not missing_switches, f"LORA_SWITCH_PAPERS names {missing_switches}, which LoraConfig does not offer"
    wanted |= {(_chapter_of(LoftQConfig), key) for key in LORA_SWITCH_PAPERS.values()}
    problems = []
    for chapter, key in sorted(wanted):
        assert key in ENTRIES, f"{key} (the paper of a method in {chapter}) is not in {BIB.name}"
        if chapter not in PAGES:
            problems.append(f"{chapter} (teaches {key}) is not in _toc.yml")
        elif key not in CITED[chapter]:
            problems.append(f"{chapter} does not cite {{cite}}`{key}`")
    assert not problems, "; ".join(problems)
