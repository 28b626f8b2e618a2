"""Training peftlab adapters in several processes: DDP (``peftlab.Trainer``, ``accelerate``), FSDP, NF4 bases.

One module is both the launcher and the worker. :func:`launch` starts ``torchrun`` (``python -m
torch.distributed.run``) on this very module; each process runs the requested recipes one after the other
(one start-up for all of them) and writes what it saw to ``out/<recipe>/rank<r>.pt``. :func:`run_recipe`
runs the same recipe in the calling process (world size 1), which is the one-process reference on the
same global batches: step k of a run with W processes of ``per_rank_batch`` rows each uses the rows
``[k·W·b, (k+1)·W·b)`` of the data, rank r the r-th block of ``b`` rows (a sequential sampler; accelerate
hands batch ``k·W + r`` to rank r), which is exactly batch k of one process with ``W·b`` rows.

Recipes (all train a LoRA adapter on the lab LM's architecture):

* ``trainer``: :class:`peftlab.Trainer`, which ``torchrun`` turns into DDP over gloo (on GPUs: NCCL);
* ``accelerate``: a plain loop with ``accelerate.Accelerator`` (``prepare``, ``backward``);
* ``nf4``: the same loop on a base quantised to NF4 by :mod:`peftlab.quantization` (QLoRA); the 4-bit
  weights are buffers, so DDP neither all-reduces them nor (``broadcast_buffers=False``) broadcasts them;
* ``fsdp``: torch's FSDP2 (``fully_shard`` on every decoder layer and the whole model): the frozen base and
  the adapter are sharded across the processes, only the adapter trains, rank 0 writes the adapter, and the
  folder is copied back into a fresh sharded model as ``peftlab.Trainer`` resumes;
* ``trainer_fsdp`` (GPUs only, ``Setup(device="cuda")``): :class:`peftlab.Trainer` with transformers' own
  ``fsdp=True`` (FSDP2, one unit per decoder layer); ``save_model`` writes the adapter from the state dict
  FSDP gathers. With ``use_cpu=True`` transformers trains with DDP instead, so this one is not run on CPUs::

      torchrun --standalone --nproc_per_node=2 -m peftlab.lab.distributed --out runs \\
          --recipes trainer trainer_fsdp --setup '{"device": "cuda"}'

  and compare ``runs/trainer_fsdp/rank*.pt`` with ``runs/trainer/rank*.pt`` (equal to float rounding).

Every record holds the adapter after training (full tensors), the losses, which tensors DDP's reducer holds
(``num_parameter_tensors``, bytes) and whether this rank wrote the adapter folder.

Explained in: book/distributed.ipynb
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RECIPES = ("trainer", "accelerate", "nf4", "fsdp")  # run on CPUs (gloo) in the tests and the book
GPU_RECIPES = ("trainer_fsdp",)  # need CUDA devices: transformers falls back to DDP on CPUs


@dataclass(frozen=True)
class Setup:
    """Sizes of a run; the same for every process and for the one-process reference.

    Explained in: book/distributed.ipynb
    """

    steps: int = 3
    per_rank_batch: int = 4
    world_size: int = 2  # the number of processes whose global batches the data is cut for
    digits: int = 5  # a copy example is "<bos> x₁..x_d = x₁..x_d", every token predicted (all rows equal length)
    r: int = 4
    lr: float = 1e-2
    seed: int = 0
    profile: str = "smoke"  # the lab LM's size (lab_config(profile))
    pretrained: bool = False  # load the pretrained lab LM from the cache (the book) or a fresh one (the tests)
    device: str = "cpu"  # "cuda": one GPU per process, NCCL (never run by the tests: they have no GPUs)


# ---- model and data ------------------------------------------------------------------------------
def build_model(setup: Setup, quantize: bool = False) -> Any:
    """The lab LM (fresh, or pretrained from the cache) with a LoRA adapter on ``q_proj``/``v_proj``; with
    ``quantize`` its linear layers (not ``lm_head``) are NF4 first, as in QLoRA.

    Explained in: book/distributed.ipynb
    """
    from peftlab import LoraConfig, TaskType, get_peft_model
    from peftlab.lab import lm
    from peftlab.lab.profile import seed_everything

    if setup.pretrained:
        base, _ = lm.load_lab_model(setup.profile, progress=False)
        base = base.to("cpu")
    else:
        base = lm.build_model(lm.lab_config(setup.profile), seed=setup.seed)
    if quantize:
        from peftlab.quantization import quantize_model

        quantize_model(base)
    seed_everything(setup.seed)  # the same adapter initialisation in every process
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=setup.r, lora_alpha=2 * setup.r,
                        target_modules=["q_proj", "v_proj"])
    return get_peft_model(base, config)


def global_batches(setup: Setup) -> torch.Tensor:
    """(steps · world_size · per_rank_batch, length) token ids of copy examples, the same in every process.

    Explained in: book/distributed.ipynb
    """
    from peftlab.lab import lm, tasks

    vocab = {w: i for i, w in enumerate(lm.vocabulary())}
    digits = torch.tensor([vocab[d] for d in tasks.DIGITS])
    n = setup.steps * setup.world_size * setup.per_rank_batch
    g = torch.Generator().manual_seed(setup.seed + 1)
    x = digits[torch.randint(len(digits), (n, setup.digits), generator=g)]
    bos = torch.full((n, 1), vocab[lm.BOS])
    sep = torch.full((n, 1), vocab[tasks.SEP])
    return torch.cat([bos, x, sep, x], dim=1)


def rows_per_process(setup: Setup, world: int) -> int:
    """Rows of one process's batch: ``per_rank_batch`` with ``world_size`` processes, all of a global batch alone."""
    if setup.world_size % world:
        raise ValueError(f"world size {world} does not divide setup.world_size={setup.world_size}")
    return setup.per_rank_batch * setup.world_size // world


def full_adapter(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their on-disk names, whole (FSDP's shards gathered: a collective, so every
    rank calls it), detached copies on the CPU.

    Explained in: book/distributed.ipynb
    """
    from torch.distributed.tensor import DTensor

    from peftlab.utils.save_and_load import get_peft_model_state_dict

    state = get_peft_model_state_dict(_unwrap(model))
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in state.items()}


def save_full_adapter(model: Any, state: dict[str, torch.Tensor], folder: str | os.PathLike) -> None:
    """Write ``state`` (from :func:`full_adapter`) as ``save_pretrained`` would: the folder a sharded model's
    rank 0 writes. Call it on one process only.

    Explained in: book/distributed.ipynb
    """
    from peftlab.trainer import save_adapter_states

    save_adapter_states(_unwrap(model), {"default": state}, folder)


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


# ---- what a rank records --------------------------------------------------------------------------
@contextlib.contextmanager
def _count_adapter_writes() -> Any:
    """Count the calls that write adapter files in this process (``PeftModel._save_adapters`` runs only when
    ``save_pretrained(..., is_main_process=True)``; ``Trainer._save`` calls ``save_adapter_states`` on the main
    process only)."""
    from peftlab import trainer
    from peftlab.peft_model import PeftModel

    # save_pretrained writes through _save_adapters; Trainer._save with a gathered state dict (FSDP) through
    # save_adapter_states
    originals = (PeftModel._save_adapters, trainer.save_adapter_states)
    calls = []

    def counting(fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return fn(*args, **kwargs)
        return counted

    PeftModel._save_adapters = counting(originals[0])
    trainer.save_adapter_states = counting(originals[1])
    try:
        yield calls
    finally:
        PeftModel._save_adapters, trainer.save_adapter_states = originals


def _reducer(ddp: Any) -> dict[str, Any]:
    """What DDP's reducer all-reduces: its parameter tensors (names and bytes) and bucket count."""
    data = ddp._get_ddp_logging_data()
    names = [n for n, p in ddp.module.named_parameters() if p.requires_grad]
    return {"num_parameter_tensors": int(data["num_parameter_tensors"]),
            "total_parameter_size_bytes": int(data["total_parameter_size_bytes"]),
            "trainable_names": names,
            "trainable_bytes": sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad),
            "broadcast_buffers": bool(ddp.broadcast_buffers)}


# ---- recipes --------------------------------------------------------------------------------------
def _trainer(setup: Setup, out: Path, world: int, fsdp: bool = False) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainingArguments

    from peftlab.trainer import Trainer

    model = build_model(setup)
    data = global_batches(setup).tolist()
    args = TrainingArguments(output_dir=str(out / "run"), per_device_train_batch_size=rows_per_process(setup, world),
                             max_steps=setup.steps, learning_rate=setup.lr, lr_scheduler_type="constant",
                             train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
                             report_to=[], disable_tqdm=True, use_cpu=setup.device == "cpu", seed=setup.seed,
                             ddp_backend=_backend(setup) if world > 1 else None, dataloader_pin_memory=False,
                             **_trainer_fsdp_args(world) if fsdp else {})
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": data, "labels": data}))
    trainer.remove_callback(PrinterCallback)  # the losses are returned, not printed
    with _count_adapter_writes() as writes:
        trainer.train()
        trainer.save_model(str(out / "adapter"))
    ddp = trainer.model_wrapped
    is_ddp = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "reducer": _reducer(ddp) if is_ddp else None, "wrote": len(writes),
            "adapter": full_adapter(trainer.model), "wrapper": type(ddp).__name__}


def _trainer_fsdp_args(world: int) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise RuntimeError("recipe trainer_fsdp needs CUDA devices (transformers trains with DDP when use_cpu=True); "
                           "on a GPU machine: torchrun --nproc_per_node=2 -m peftlab.lab.distributed --out OUT "
                           "--recipes trainer trainer_fsdp --setup '{\"device\": \"cuda\"}'")
    if world == 1:
        return {}  # the one-process reference is the plain trainer recipe
    return {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                          "state_dict_type": "FULL_STATE_DICT"}}


def _backend(setup: Setup) -> str:
    return "nccl" if setup.device == "cuda" else "gloo"


def _accelerate(setup: Setup, out: Path, world: int, quantize: bool = False) -> dict[str, Any]:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from torch.utils.data import DataLoader

    # NF4 codes are buffers: do not broadcast them at every forward (each process quantised the same base)
    accelerator = Accelerator(cpu=setup.device == "cpu", kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=not quantize)])
    model = build_model(setup, quantize=quantize)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setup.lr)
    loader = DataLoader(global_batches(setup), batch_size=rows_per_process(setup, world), shuffle=False)
    ddp, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses = []
    ddp.train()
    for ids in loader:
        loss = ddp(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())  # the global batch's loss
    with _count_adapter_writes() as writes:
        accelerator.unwrap_model(ddp).save_pretrained(out / "adapter", is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    record = {"losses": losses, "reducer": _reducer(ddp) if ddp is not model else None, "wrote": len(writes),
              "adapter": full_adapter(model)}
    if quantize:
        codes = [b for n, b in model.named_buffers() if n.endswith("weight_codes")]
        record["nf4"] = {"layers": len(codes), "codes_sum": int(sum(int(c.long().sum()) for c in codes)),
                         "in_parameters": any(n.endswith("weight_codes") for n, _ in model.named_parameters())}
    return record


def _fsdp(setup: Setup, out: Path, world: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from peftlab.trainer import load_adapters_from_checkpoint

    model = _sharded(build_model(setup).to(setup.device), world)
    layers = model.get_base_model().model.layers
    base_weight = layers[0].self_attn.q_proj.base_layer.weight
    sharded = {"base_local_numel": int(base_weight.to_local().numel() if isinstance(base_weight, DTensor)
                                       else base_weight.numel()),
               "base_numel": int(base_weight.numel()),
               "base_requires_grad": bool(base_weight.requires_grad)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setup.lr)
    rank = dist.get_rank() if world > 1 else 0
    b = rows_per_process(setup, world)
    data = global_batches(setup).to(setup.device)
    losses = []
    model.train()
    for step in range(setup.steps):
        ids = data[(step * world + rank) * b:(step * world + rank + 1) * b]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # FSDP reduce-scatters (averages) the adapter's gradients
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    adapter = full_adapter(model)  # every rank gathers the shards ...
    if rank == 0:  # ... one writes
        save_full_adapter(model, adapter, out / "adapter")
    if world > 1:
        dist.barrier()  # the folder is whole before any process reads it
    # resuming: the folder copied into a fresh sharded model (each process takes its shards of the saved tensors)
    fresh = _sharded(build_model(setup).to(setup.device), world)
    load_adapters_from_checkpoint(fresh, out / "adapter")
    reloaded = full_adapter(fresh)
    sharded["reloaded_equal"] = all(torch.equal(reloaded[k], v) for k, v in adapter.items())
    return {"losses": losses, "reducer": None, "wrote": int(rank == 0), "adapter": adapter, "fsdp": sharded}


def _sharded(model: Any, world: int) -> Any:
    """FSDP2 over ``world`` processes: one unit per decoder layer, the embeddings and head in the root unit."""
    from torch.distributed.fsdp import fully_shard

    if world > 1:
        for layer in model.get_base_model().model.layers:  # one all-gather per decoder layer
            fully_shard(layer)
        fully_shard(model)
    return model


def run_recipe(recipe: str, setup: Setup, out: str | os.PathLike, world: int = 1) -> dict[str, Any]:
    """Run one recipe in this process (``world`` = the number of processes started alongside it).

    Explained in: book/distributed.ipynb
    """
    out = Path(out)
    if recipe == "trainer":
        return _trainer(setup, out, world)
    if recipe == "accelerate":
        return _accelerate(setup, out, world)
    if recipe == "nf4":
        return _accelerate(setup, out, world, quantize=True)
    if recipe == "fsdp":
        return _fsdp(setup, out, world)
    if recipe == "trainer_fsdp":
        return _trainer(setup, out, world, fsdp=True)
    raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES + GPU_RECIPES)}")


def run_single(recipes: tuple[str, ...], setup: Setup, out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The one-process reference of each recipe, in this process, on the same global batches.

    Explained in: book/distributed.ipynb
    """
    results = {}
    for recipe in recipes:
        with _single_process_env():
            results[recipe] = run_recipe(recipe, setup, Path(out) / recipe, world=1)
    return results


@contextlib.contextmanager
def _single_process_env() -> Any:
    """accelerate keeps one global state per process: start each reference run from a clean one."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()


# ---- launching ----------------------------------------------------------------------------------
def command(recipes: tuple[str, ...], setup: Setup, out: str | os.PathLike, nproc: int = 2,
            python: str | None = None) -> list[str]:
    """The ``torchrun`` command line that runs ``recipes`` in ``nproc`` processes (one machine).

    Explained in: book/distributed.ipynb
    """
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "peftlab.lab.distributed", "--out", os.fspath(out), "--recipes", *recipes,
            "--setup", json.dumps(dataclasses.asdict(setup))]


def launch(recipes: tuple[str, ...], setup: Setup, out: str | os.PathLike, nproc: int = 2,
           timeout: float = 600) -> dict[str, list[dict[str, Any]]]:
    """Run ``recipes`` in ``nproc`` CPU processes (gloo, one thread each) and return each rank's records:
    ``{recipe: [rank 0's, rank 1's, ...]}``. A failing worker raises with the end of its output.

    Explained in: book/distributed.ipynb
    """
    if setup.world_size != nproc:
        raise ValueError(f"setup.world_size={setup.world_size} but nproc={nproc}: the data is cut for "
                         f"{setup.world_size} processes")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    root = str(Path(__file__).resolve().parents[2])  # this checkout, first on the workers' path
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    start = time.perf_counter()
    proc = subprocess.run(command(recipes, setup, out, nproc), env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    results = {r: [torch.load(Path(out) / r / f"rank{k}.pt", weights_only=True) for k in range(nproc)]
               for r in recipes}
    for records in results.values():
        for rec in records:
            rec["launch_seconds"] = time.perf_counter() - start
    return results


def _worker(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one torchrun worker: run recipes, save this rank's records")
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES + GPU_RECIPES, required=True)
    parser.add_argument("--setup", default="{}")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist

    setup = Setup(**json.loads(a.setup))
    if setup.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(_backend(setup))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for recipe in a.recipes:
            start = time.perf_counter()
            record = run_recipe(recipe, setup, Path(a.out) / recipe, world)
            record["seconds"] = time.perf_counter() - start
            record["world"] = world
            os.makedirs(Path(a.out) / recipe, exist_ok=True)
            torch.save(record, Path(a.out) / recipe / f"rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    _worker()
