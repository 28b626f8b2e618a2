"""Files: atomic writes, safetensors in and out, and finding an adapter folder.

A file is written under a temporary name and renamed over its final name; a folder (an adapter with its
config and weights, a merged model) is written as a staging folder beside the final one and exchanged with
it in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so a process killed at any point leaves either the
previous folder or the new one under the final name, never a mix and never half a file.

Explained in: book/configs.ipynb, book/reliability.ipynb
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"


def _atomic_replace(path: str, write) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path`` (readers never see half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` (both existing) in one atomic step; False where the system cannot.

    Explained in: book/reliability.ipynb
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL/ENOSYS (file system without exchange), EXDEV, ...: the caller falls back


def publish_folder(stage: str, final: str) -> None:
    """Put the finished folder ``stage`` at ``final`` (a sibling), replacing what is there atomically when the
    system allows; the replaced folder is deleted afterwards.

    Without an atomic exchange the old folder is renamed aside first; only a kill in the instant between the
    two renames then leaves no folder at ``final`` (the old one stays whole, beside it, under ``.tmp-``).

    Explained in: book/reliability.ipynb
    """
    if not os.path.lexists(final):
        os.rename(stage, final)
        return
    if exchange_paths(stage, final):
        shutil.rmtree(stage, ignore_errors=True)  # now the old folder
        return
    old = f"{stage}.old"
    os.rename(final, old)
    os.rename(stage, final)
    shutil.rmtree(old, ignore_errors=True)


def _link_tree(src: str, dst: str) -> None:
    """Recreate ``src`` inside the empty folder ``dst`` with hard links (copies where links fail)."""
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else os.path.join(dst, rel)
        for d in dirs:
            os.makedirs(os.path.join(target, d), exist_ok=True)
        for f in files:
            a, b = os.path.join(root, f), os.path.join(target, f)
            if os.path.islink(a):
                os.symlink(os.readlink(a), b)
                continue
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, keep_existing: bool = False) -> Iterator[str]:
    """Yield a staging folder beside ``final``; when the block finishes, it becomes ``final`` in one step.

    ``keep_existing=True`` starts the staging folder as a copy of ``final`` (hard links: no data is copied), so
    files the block does not write (other adapters' sub-folders, a README) are kept; otherwise ``final`` is
    replaced as a whole. If the block raises, or the process dies, ``final`` is untouched. Written files must
    be new files (``save_file``, ``torch.save``, ``save_pretrained``), never edits of a linked one in place.

    Use it around any folder save, e.g. a merged model::

        with atomic_folder("merged") as tmp:
            model.merge_and_unload().save_pretrained(tmp)

    Explained in: book/reliability.ipynb
    """
    final = os.path.abspath(os.fspath(final))
    if os.path.isfile(final):
        raise ValueError(f"{final} is a file; pass a folder path")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=parent)
    try:
        if os.path.isdir(final):
            os.chmod(stage, stat.S_IMODE(os.stat(final).st_mode))
            if keep_existing:
                _link_tree(final, stage)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(stage, 0o777 & ~umask)
        yield stage
        publish_folder(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_replace(path, write)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str, safe_serialization: bool = True) -> None:
    """Save a flat dict of tensors as safetensors (metadata ``{"format": "pt"}``) or, if asked, with torch.save."""
    # safetensors refuses shared or non-contiguous storage: give every tensor its own contiguous copy.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        _atomic_replace(path, lambda tmp: save_file(clean, tmp, metadata={"format": "pt"}))
    else:
        _atomic_replace(path, lambda tmp: torch.save(clean, tmp))


def load_adapter_weights(folder: str, allow_pickle: bool | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read the adapter tensors of ``folder``: safetensors, else a ``.bin`` file.

    A ``.bin`` file is read as peft reads it, with ``torch.load(weights_only=True)``: tensors and plain
    containers only, never a full unpickle (a file that needs one fails). By default a warning says that
    safetensors is preferred; ``allow_pickle=True`` reads it without the warning, ``allow_pickle=False``
    refuses it.

    Explained in: book/configs.ipynb
    """
    st = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    pt = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(st):
        try:
            return load_file(st, device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(
                f"{st} is not a readable safetensors file ({exc}); it may be truncated or corrupt: save the "
                "adapter again"
            ) from None
    if os.path.isfile(pt):
        if allow_pickle is False:
            raise ValueError(
                f"{folder} holds only {WEIGHTS_NAME}, a pickle file, and allow_pickle=False refuses it; re-save it as "
                f"{SAFETENSORS_WEIGHTS_NAME} (or leave allow_pickle unset: it is then read with "
                "torch.load(weights_only=True))"
            )
        if allow_pickle is None:
            warnings.warn(f"{folder} holds {WEIGHTS_NAME}, a pickle file: reading it with torch.load(weights_only=True), "
                          f"which loads tensors only. {SAFETENSORS_WEIGHTS_NAME} is the preferred format (save the "
                          "adapter again to convert it)", UserWarning, stacklevel=3)
        try:
            return torch.load(pt, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            raise ValueError(f"{pt} could not be read with torch.load(weights_only=True) ({exc}); it may be "
                             "truncated, corrupt, or hold objects other than tensors") from None
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(
        f"no adapter weights in {folder}: expected {SAFETENSORS_WEIGHTS_NAME}; files there: {present or 'none'}"
    )


def resolve_adapter_dir(name_or_path: str | os.PathLike, subfolder: str | None = None,
                        filenames: Iterable[str] = (), **hub_kwargs) -> str:
    """Return a local folder for ``name_or_path``: the folder itself, or a Hub snapshot of the named files."""
    path = os.fspath(name_or_path)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    if os.path.exists(path) or path.startswith((".", "/", "~")) or os.sep in path and path.count("/") > 1:
        raise FileNotFoundError(f"adapter folder {local!r} does not exist")
    try:  # a Hub repository id such as "ybelkada/opt-350m-lora"
        from huggingface_hub import snapshot_download

        allow = [f"{subfolder}/{f}" if subfolder else f for f in (*filenames, "adapter_config.json",
                                                                   "adapter_model.safetensors")]
        root = snapshot_download(path, allow_patterns=allow, revision=hub_kwargs.get("revision"))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, ...: one message for the user
        raise FileNotFoundError(
            f"{path!r} is neither a local folder nor a Hub repository that could be fetched ({type(exc).__name__}: "
            f"{exc}); pass the folder written by save_pretrained"
        ) from None
    return os.path.join(root, subfolder) if subfolder else root
