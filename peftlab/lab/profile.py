"""Run profiles: one switch that sizes every experiment in the book.

``PEFTLAB_PROFILE=smoke|cpu|gpu`` picks how big the experiments are:

* ``smoke``: seconds per chapter, for CI; results are small but still meaningful.
* ``cpu``: the default without a GPU; a couple of minutes per chapter on two cores.
* ``gpu``: the default with CUDA; real hub models and longer runs.

Chapters size everything through :meth:`Profile.pick`, never by editing numbers.

smoke and cpu never touch the network: importing this module in those profiles sets the hub libraries
offline (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``), so nothing waits on a
network timeout. ``PEFTLAB_GPU_SIM=1`` runs the chapters' GPU sections in smoke or cpu on shrunk copies of
the hub models (:mod:`peftlab.lab.hub`).

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
ENV_GPU_SIM = "PEFTLAB_GPU_SIM"
OFFLINE_VARS: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

_NOT_GIVEN: Any = object()


@dataclass(frozen=True)
class Profile:
    """A named run size (smoke, cpu or gpu) and the device it runs on.

    Explained in: book/lab.ipynb
    """

    name: str
    device: torch.device
    gpu_sim: bool = False  # the GPU sections run on shrunk hub models (PEFTLAB_GPU_SIM=1, never in gpu)

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

    @property
    def gpu_sections(self) -> bool:
        """True when the chapters' "On a GPU" sections run: the gpu profile, or simulated (``PEFTLAB_GPU_SIM=1``).

        Explained in: book/reliability.ipynb
        """
        return self.name == "gpu" or self.gpu_sim

    def hub(self, repo_id: str) -> str:
        """What to pass to ``from_pretrained`` for hub repository ``repo_id``: the id itself, or, when the GPU
        sections are simulated, a local folder with the same architecture shrunk (:mod:`peftlab.lab.hub`).

        Explained in: book/reliability.ipynb
        """
        if self.gpu_sim and self.name != "gpu":
            from peftlab.lab import hub

            return str(hub.simulated_repo(repo_id))
        return repo_id

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA); nothing on a CPU. For timing.

        Explained in: book/reliability.ipynb
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __str__(self) -> str:
        sim = " gpu_sections=simulated" if self.gpu_sim else ""
        return f"profile={self.name} device={self.device}{sim}"


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r} (from {ENV_PROFILE} or the argument); "
            f"valid profiles: {', '.join(PROFILES)}"
        )
    return key


def gpu_simulated() -> bool:
    """True when ``PEFTLAB_GPU_SIM`` asks for the GPU sections to run simulated (``1``/``true``/``yes``).

    Explained in: book/reliability.ipynb
    """
    value = os.environ.get(ENV_GPU_SIM, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{ENV_GPU_SIM}={value!r}: use 1 (simulate the GPU sections) or 0")


def go_offline() -> None:
    """Set the hub libraries offline (``HF_HUB_OFFLINE=1``, ...), also in already imported modules.

    A variable the user set explicitly is kept. Called at import in smoke and cpu.

    Explained in: book/reliability.ipynb
    """
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")
    if os.environ["HF_HUB_OFFLINE"].strip().lower() not in ("1", "true", "yes", "on"):
        return  # the user asked for the network
    import sys

    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = True
        ds_config.HF_DATASETS_OFFLINE = True


def _default_name() -> str:
    name = os.environ.get(ENV_PROFILE, "").strip().lower()
    return name or ("gpu" if torch.cuda.is_available() else "cpu")


def get(name: Optional[str] = None) -> Profile:
    """Build the profile called ``name`` (``None``: read ``PEFTLAB_PROFILE``, else the default).

    The default is ``gpu`` when CUDA is available, otherwise ``cpu``. Asking for ``gpu``
    without CUDA raises ``RuntimeError``. ``PEFTLAB_GPU_SIM=1`` simulates the GPU sections in smoke and
    cpu (and is ignored in gpu, where they run for real).

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
    return Profile(key, torch.device("cpu"), gpu_sim=gpu_simulated())


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
    if prof.name in ("smoke", "cpu"):
        go_offline()
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
            + (" | GPU sections: simulated on shrunk hub models" if prof.gpu_sim else "")
        )
    return prof


if _default_name() in ("smoke", "cpu"):
    go_offline()  # at import: before any chapter cell can reach for the network
