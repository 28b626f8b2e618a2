"""The lab cache: one folder for everything the lab trains once and every chapter reuses.

The folder is ``$PEFTLAB_CACHE``, else ``~/.cache/peftlab``. An entry is named by a hash of the
configuration that produced it, so a changed recipe never loads a stale entry. Entries are
written under a temporary name and renamed into place while a lock file is held: two processes
(parallel notebooks) build an entry once, and an interrupted run leaves no half-written entry.

Layout::

    $PEFTLAB_CACHE/
        lab-lm-<profile>-seed<s>-<hash12>/     the lab LM (save_pretrained folder; peftlab.lab.lm)
        digits/<kind>-<hash16>.safetensors     digits models and the digit pipeline (cached_module)
        <entry>.lock                           lock files, next to what they guard

Explained in: book/lab.ipynb
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Union

import torch.nn as nn

__all__ = [
    "DEFAULT_CACHE",
    "ENV_CACHE",
    "LabCacheError",
    "atomic_path",
    "cache_root",
    "cached_module",
    "config_hash",
    "entry_path",
    "file_lock",
]

ENV_CACHE = "PEFTLAB_CACHE"
DEFAULT_CACHE = "~/.cache/peftlab"
PathLike = Union[str, Path]


class LabCacheError(OSError):
    """The lab cache folder cannot be created or written.

    Explained in: book/lab.ipynb
    """


def cache_root(cache_dir: PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$PEFTLAB_CACHE``, else ``~/.cache/peftlab``; created, checked writable.

    Raises :class:`LabCacheError` (an ``OSError``) naming the folder and how to choose another.

    Explained in: book/lab.ipynb
    """
    env = os.environ.get(ENV_CACHE, "").strip()
    raw = cache_dir if cache_dir is not None else env or DEFAULT_CACHE
    root = Path(raw).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        source = "the cache_dir argument" if cache_dir is not None else f"${ENV_CACHE}" if env else "the default"
        raise LabCacheError(
            f"the lab cache folder {str(root)!r} (from {source}) is not writable ({err.strerror or err}); "
            f"set {ENV_CACHE} to a writable folder, e.g. {ENV_CACHE}=/tmp/peftlab-cache"
        ) from None
    return root


def config_hash(payload: Mapping[str, Any], length: int = 16) -> str:
    """The first ``length`` hex digits of sha256(JSON of ``payload``, keys sorted): the name of a cache entry.

    Everything that changes the result (recipe, sizes, seed, a format version) belongs in ``payload``.

    Explained in: book/lab.ipynb
    """
    blob = json.dumps(dict(payload), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_lock(target: PathLike, timeout: float = -1) -> Any:
    """A ``filelock.FileLock`` on ``<target>.lock``: hold it while checking for, building and writing ``target``.

    ``timeout`` in seconds (−1: wait for as long as it takes).

    Explained in: book/lab.ipynb
    """
    from filelock import FileLock

    return FileLock(f"{target}.lock", timeout=timeout)


@contextlib.contextmanager
def atomic_path(final: PathLike, *, folder: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file (or, with ``folder=True``, folder) next to ``final``; rename it to ``final``
    when the block succeeds, delete it when the block raises.

    A file is made readable by everyone (0644, like the rest of ``~/.cache``); an existing
    ``final`` is replaced (a folder is removed first: an incomplete entry of an interrupted run).

    Explained in: book/lab.ipynb
    """
    final = Path(final)
    prefix = f".tmp-{final.name}-"
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix))
    else:
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=prefix, suffix=suffix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder:
            if final.exists():
                shutil.rmtree(final)
        else:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like ~/.cache
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def entry_path(folder: str, kind: str, config: Mapping[str, Any]) -> Path:
    """Where :func:`cached_module` keeps ``kind`` built with ``config``: ``<root>/<folder>/<kind>-<hash16>.safetensors``.

    Explained in: book/lab.ipynb
    """
    return cache_root() / folder / f"{kind}-{config_hash(config)}.safetensors"


def cached_module(
    folder: str,
    kind: str,
    config: Mapping[str, Any],
    build: Callable[[], tuple[nn.Module, dict]],
    make: Callable[[], nn.Module],
    *,
    timeout: float = 900,
) -> tuple[nn.Module, dict]:
    """Load module ``kind`` built with ``config`` from the cache, or ``build()`` it once and store it.

    ``build() -> (module, info)`` trains it; ``make()`` gives an untrained module of the same shape
    to load the stored state dict into; ``info`` (JSON) travels in the file's metadata. Returns
    (module on CPU, info). The state dict is saved as safetensors under a temporary name and
    renamed, under a file lock; an unreadable or stale entry is built again and overwritten.

    Explained in: book/lab.ipynb
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    path = entry_path(folder, kind, config)
    path.parent.mkdir(exist_ok=True)
    with file_lock(path, timeout):
        if path.exists():
            try:
                module = make()
                module.load_state_dict(load_file(str(path)))
                with safe_open(str(path), framework="pt") as fh:
                    info = json.loads(fh.metadata()["info"])
                return module, info
            except (SafetensorError, OSError, KeyError, RuntimeError, ValueError):
                pass  # unreadable or stale entry: build again and overwrite it
        module, info = build()
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
        meta = {"info": json.dumps(info), "config": json.dumps(dict(config), sort_keys=True)}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    return module, info
