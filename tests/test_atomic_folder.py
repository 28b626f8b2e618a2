"""atomic_folder / publish_folder: the building blocks of every folder save."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import peftlab.utils.io as pio
from peftlab.utils.io import atomic_folder, publish_folder


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_keep_existing_keeps_other_files_and_replaces_the_written_ones(tmp_path: Path) -> None:
    final = tmp_path / "out"
    (final / "fr").mkdir(parents=True)
    (final / "README.md").write_text("mine")
    (final / "fr" / "adapter_config.json").write_text("fr v1")
    (final / "adapter_config.json").write_text("v1")
    os.chmod(final, 0o750)
    with atomic_folder(final, keep_existing=True) as stage:
        (Path(stage) / "adapter_config.json").unlink()  # a new file, never an edit of the linked one
        (Path(stage) / "adapter_config.json").write_text("v2")
        assert _tree(final)["adapter_config.json"] == "v1"  # nothing visible before the block ends
    assert _tree(final) == {"README.md": "mine", "adapter_config.json": "v2", "fr/adapter_config.json": "fr v1"}
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o750
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_without_keep_existing_the_folder_is_replaced_whole(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.bin").write_text("old")
    with atomic_folder(final) as stage:
        (Path(stage) / "model.safetensors").write_text("new")
    assert _tree(final) == {"model.safetensors": "new"}


def test_an_error_in_the_block_leaves_the_folder_and_no_staging(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(final, keep_existing=True) as stage:
            (Path(stage) / "b.txt").write_text("half")
            raise RuntimeError("disk full")
    assert _tree(final) == {"a.txt": "old"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_file_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        with atomic_folder(tmp_path / "f"):
            pass


def test_publish_without_an_atomic_exchange_falls_back_to_rename(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pio, "exchange_paths", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    final, stage = tmp_path / "out", tmp_path / ".tmp-out-x"
    final.mkdir()
    (final / "a").write_text("old")
    stage.mkdir()
    (stage / "a").write_text("new")
    publish_folder(str(stage), str(final))
    assert _tree(final) == {"a": "new"} and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="renameat2 is Linux")
def test_exchange_paths_swaps_two_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert pio.exchange_paths(str(a), str(b))
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
