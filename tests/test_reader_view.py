"""Chapter hygiene as a reader meets a page (CONTRIBUTING.md): bookkeeping out of sight, exercises that do not
give their answers away, tables as DataFrames, a diagram per method, a reading order that starts with PEFT."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))
HIDDEN = {"remove-cell", "remove-input", "hide-input"}


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _src(cell: dict) -> str:
    return "".join(cell["source"])


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def _top_level_calls(source: str, name: str) -> int:
    try:
        tree = ast.parse("\n".join("#" + line if line.lstrip().startswith(("%", "!")) else line
                                   for line in source.splitlines()))
    except SyntaxError:
        return 0
    return sum(isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and getattr(st.value.func, "id", "") == name
               for st in tree.body)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_glue_lines_are_out_of_sight(path: Path) -> None:
    visible = [i for i, c in enumerate(_cells(path)) if c["cell_type"] == "code" and not (_tags(c) & HIDDEN)
               and _top_level_calls(_src(c), "glue")]
    assert not visible, f"{path.name}: cells {visible} show glue() lines; move them to a cell tagged remove-cell"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_exercise_checkers_are_hidden_and_answers_come_last(path: Path) -> None:
    cells = _cells(path)
    for i, c in enumerate(cells):
        if c["cell_type"] == "code" and "def check_exercise" in _src(c):
            assert _tags(c) & {"remove-input", "remove-cell"}, f"{path.name} cell {i}: the checker is visible"
    answers = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and ":class: dropdown" in _src(c)
                    and "Answer" in _src(c)), len(cells))
    for i, c in enumerate(cells[:answers]):
        if c["cell_type"] == "code" and "check_exercise_" in _src(c) and "def check_exercise" not in _src(c):
            for line in _src(c).splitlines():
                if line.startswith("answer_"):
                    assert line.split("=", 1)[1].split("#")[0].strip() == "None", \
                        f"{path.name} cell {i}: an exercise cell above the answers holds an answer: {line!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_tables_are_dataframes_not_markdown_strings(path: Path) -> None:
    bad = [i for i, c in enumerate(_cells(path)) if c["cell_type"] == "code" and "Markdown(" in _src(c)]
    assert not bad, f"{path.name}: cells {bad} display markdown strings; show a pandas DataFrame instead"


@pytest.mark.parametrize("chapter, methods", [("lora", ["lora"]), ("lora_in_practice", ["dora"]),
                                              ("loha_lokr", ["loha", "lokr"]), ("oft_boft", ["oft", "boft"]),
                                              ("ia3", ["ia3"]), ("llama_adapter", ["llama_adapter"]),
                                              ("xlora", ["xlora"]), ("adalora", ["adalora"])])
def test_method_chapters_draw_their_diagram(chapter: str, methods: list[str]) -> None:
    text = "\n".join(_src(c) for c in _cells(ROOT / "book" / f"{chapter}.ipynb") if c["cell_type"] == "code")
    for m in methods:
        assert f'method_diagram("{m}"' in text, f"book/{chapter}.ipynb does not draw viz.method_diagram({m!r})"


def test_reading_order_starts_with_peft_and_ends_with_reference() -> None:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    assert toc["root"] == "book/introduction" and files[:2] == ["book/quickstart", "book/lora"]
    assert files.index("book/products") == files.index("book/loha_lokr") - 1
    reference = toc["parts"][-1]
    assert reference["caption"] == "Reference"
    assert {"book/notation", "book/lab"} <= {ch["file"] for ch in reference["chapters"]}
    methods = next(p for p in toc["parts"] if p["caption"] == "Methods")
    assert "book/loha_lokr" in [ch["file"] for ch in methods["chapters"]]


# ---- visible cells stay short --------------------------------------------------------------------------------------
# A visible code cell is one a reader sees without opening anything (no remove-cell/remove-input/hide-input tag).
# d2l keeps most under ten lines; experiment machinery belongs in peftlab/lab/ (tested helpers), bookkeeping (glue,
# metric and plotting helpers) in hidden cells, and a long experiment is split into cells of one step each.
VISIBLE_CELL_MAX = 15


def _longest_visible_cell(path: Path) -> tuple[int, int]:
    """(lines, cell index) of the longest code cell a reader sees."""
    return max(((len(_src(c).rstrip().splitlines()), i) for i, c in enumerate(_cells(path))
                if c["cell_type"] == "code" and not (_tags(c) & HIDDEN)), default=(0, -1))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_visible_cells_are_short(path: Path) -> None:
    lines, i = _longest_visible_cell(path)
    assert lines <= VISIBLE_CELL_MAX, (
        f"{path.name} cell {i} shows {lines} lines (at most {VISIBLE_CELL_MAX}): move the experiment machinery into "
        f"a peftlab/lab/ helper, bookkeeping into a cell tagged remove-input or hide-input, or split the cell")


def test_the_cell_length_check_counts_only_visible_code(tmp_path: Path) -> None:
    def code(n: int, tags: tuple[str, ...] = ()) -> dict:
        return {"cell_type": "code", "metadata": {"tags": list(tags)}, "source": "\n".join(["x = 1"] * n) + "\n\n"}

    nb = tmp_path / "page.ipynb"
    cells = [code(40, ("hide-input",)), code(30, ("remove-cell",)), {"cell_type": "markdown", "metadata": {},
             "source": "text\n" * 50}, code(7), code(12), code(3)]
    nb.write_text(json.dumps({"cells": cells}))
    assert _longest_visible_cell(nb) == (12, 4)  # trailing blank lines do not count
