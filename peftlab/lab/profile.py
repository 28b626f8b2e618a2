"""Run profiles: one switch that sizes every experiment in the book.

``PEFTLAB_PROFILE=smoke|cpu|gpu`` picks how big the experiments are:

* ``smoke``: seconds per chapter, for CI; results are small but still meaningful.
* ``cpu``: the default without a GPU; a couple of minutes per chapter on two cores.
* ``gpu``: the default with CUDA; real hub models and longer runs.

Chapters size everything through :meth:`Profile.pick`, never by editing numbers.

Explained in: book/lab.ipynb
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import numpy as np
import torch

T = TypeVar("T")

PROFILES: tuple[str, ...] = ("smoke", "cpu", "gpu")
ENV_PROFILE = "PEFTLAB_PROFILE"
ENV_THREADS = "PEFTLAB_THREADS"

_NOT_GIVEN: Any = object()


@dataclass(frozen=True)
class Profile:
    """A named run size (smoke, cpu or gpu) and the device it runs on.

    Explained in: book/lab.ipynb
    """

    name: str
    device: torch.device

    def pick(self, smoke: T, cpu: T, gpu: T = _NOT_GIVEN) -> T:
        """Return the value for this profile; ``gpu`` defaults to the ``cpu`` value.

        Explained in: book/lab.ipynb
        """
        if self.name == "smoke":
            return smoke
        if self.name == "gpu" and gpu is not _NOT_GIVEN and gpu is not None:
            return gpu
        return cpu

    @property
    def is_smoke(self) -> bool:
        """True in the smoke profile (the CI size).

        Explained in: book/lab.ipynb
        """
        return self.name == "smoke"

    def __str__(self) -> str:
        return f"profile={self.name} device={self.device}"


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r} (from {ENV_PROFILE} or the argument); "
            f"valid profiles: {', '.join(PROFILES)}"
        )
    return key


def get(name: Optional[str] = None) -> Profile:
    """Build the profile called ``name`` (``None``: read ``PEFTLAB_PROFILE``, else the default).

    The default is ``gpu`` when CUDA is available, otherwise ``cpu``. Asking for ``gpu``
    without CUDA raises ``RuntimeError``.

    Explained in: book/lab.ipynb
    """
    if name is None:
        name = os.environ.get(ENV_PROFILE, "").strip() or None
    if name is None:
        name = "gpu" if torch.cuda.is_available() else "cpu"
    key = _check_name(name)
    if key == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "profile 'gpu' needs CUDA, but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}); use {ENV_PROFILE}=cpu or {ENV_PROFILE}=smoke"
            )
        return Profile("gpu", torch.device("cuda"))
    return Profile(key, torch.device("cpu"))


def current() -> Profile:
    """The profile selected by the environment (``PEFTLAB_PROFILE``) or the default.

    Explained in: book/lab.ipynb
    """
    return get(None)


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and CUDA).

    Explained in: book/lab.ipynb
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _peftlab_version() -> str:
    try:
        from importlib.metadata import version

        return version("peftlab")
    except Exception:  # not installed (running from a checkout)
        import peftlab

        return str(getattr(peftlab, "__version__", "unknown"))


def versions() -> dict[str, str]:
    """Versions of torch, transformers and peftlab, for the setup line.

    Explained in: book/lab.ipynb
    """
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    return {"torch": torch.__version__, "transformers": tf, "peftlab": _peftlab_version()}


def setup(seed: int = 0, name: Optional[str] = None, quiet: bool = False) -> Profile:
    """Pick the profile, seed everything, set the CPU thread count, print one summary line.

    Threads: ``PEFTLAB_THREADS`` if set; otherwise 1 in smoke and cpu, whose models are too small
    for intra-op parallelism to pay (on a shared 2-core machine, 2 threads measured 8-14x slower
    per step than 1); the gpu profile keeps torch's default.

    Explained in: book/lab.ipynb
    """
    prof = get(name)
    threads = os.environ.get(ENV_THREADS, "").strip()
    if threads:
        try:
            n = int(threads)
            if n < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"{ENV_THREADS}={threads!r} is not a positive integer") from None
        torch.set_num_threads(n)
    elif prof.name in ("smoke", "cpu"):
        torch.set_num_threads(1)
    seed_everything(seed)
    if not quiet:
        v = versions()
        print(
            f"peftlab profile: {prof.name} | device: {prof.device} | threads: {torch.get_num_threads()} | "
            f"torch {v['torch']} | transformers {v['transformers']} | peftlab {v['peftlab']}"
        )
    return prof
