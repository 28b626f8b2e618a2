"""Files: atomic writes, safetensors in and out, and finding an adapter folder.

Explained in: book/configs.ipynb
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

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


def load_adapter_weights(folder: str, allow_pickle: bool = False, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read the adapter tensors of ``folder``: safetensors, or a pickle file only when ``allow_pickle=True``.

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
        if not allow_pickle:
            raise ValueError(
                f"{folder} holds only {WEIGHTS_NAME}, a pickle file, and pickles can run code when loaded; pass "
                f"allow_pickle=True if you trust it, or re-save it as {SAFETENSORS_WEIGHTS_NAME}"
            )
        try:
            return torch.load(pt, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            raise ValueError(f"{pt} could not be read ({exc}); it may be truncated or corrupt") from None
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
