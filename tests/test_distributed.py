"""Several processes: two CPU processes (torchrun, gloo, one thread each) train a LoRA adapter on the lab LM
with peftlab.Trainer, with an accelerate loop, on an NF4 base, and with FSDP2; each equals one process.

One torchrun launch runs all four recipes (one start-up); the one-process references run in this process.
The checks are helpers called by ONE test, so that pytest-xdist (``make test`` runs ``-n 2``) cannot split
them over two workers and launch the processes twice.

Explained in: book/distributed.ipynb
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab import PeftModel
from peftlab.lab import distributed as D
from peftlab.utils.save_and_load import get_peft_model_state_dict

SETUP = D.Setup(steps=3, per_rank_batch=4, world_size=2)
DDP = ("trainer", "accelerate", "nf4")  # the recipes wrapped in DistributedDataParallel
RTOL, ATOL = 1e-5, 2e-6  # float32: two processes sum gradients in another order than one


@pytest.mark.slow
def test_two_cpu_processes_train_the_adapter_as_one_process_does(tmp_path: Path) -> None:
    multi = D.launch(D.RECIPES, SETUP, tmp_path / "multi", nproc=2)
    single = D.run_single(D.RECIPES, SETUP, tmp_path / "single")
    runs = multi, single, tmp_path
    for recipe in D.RECIPES:
        check_adapter_is_identical_on_both_ranks_and_equals_one_process(runs, recipe)
        check_only_rank_0_writes_the_adapter_folder_and_it_reloads(runs, recipe)
    for recipe in DDP:
        check_ddp_synchronises_only_the_adapter(runs, recipe)
    check_nf4_weights_are_buffers_never_broadcast_and_equal_on_both_ranks(runs)
    check_fsdp_shards_the_frozen_base(runs)


def check_adapter_is_identical_on_both_ranks_and_equals_one_process(runs, recipe: str) -> None:
    multi, single, _ = runs
    rank0, rank1 = multi[recipe]
    assert rank0["world"] == rank1["world"] == 2
    ref = single[recipe]
    initial = get_peft_model_state_dict(D.build_model(SETUP, quantize=recipe == "nf4"))
    assert set(rank0["adapter"]) == set(ref["adapter"]) == set(initial)
    for k, v in rank0["adapter"].items():
        assert torch.equal(v, rank1["adapter"][k]), k  # bit-identical replicas
        torch.testing.assert_close(v, ref["adapter"][k], rtol=RTOL, atol=ATOL)
        assert not torch.equal(v, initial[k]), k  # it trained
    assert len(rank0["losses"]) == len(ref["losses"]) == SETUP.steps
    assert rank0["losses"] == pytest.approx(ref["losses"], rel=RTOL)


def check_ddp_synchronises_only_the_adapter(runs, recipe: str) -> None:
    multi, _, _ = runs
    for rec in multi[recipe]:
        red = rec["reducer"]
        adapter_bytes = sum(t.numel() * t.element_size() for t in rec["adapter"].values())
        assert red["num_parameter_tensors"] == len(rec["adapter"]) == len(red["trainable_names"])
        assert red["total_parameter_size_bytes"] == red["trainable_bytes"] == adapter_bytes
        assert all(".lora_" in n for n in red["trainable_names"])


def check_nf4_weights_are_buffers_never_broadcast_and_equal_on_both_ranks(runs) -> None:
    multi, single, _ = runs
    rank0, rank1 = multi["nf4"]
    assert rank0["nf4"]["layers"] > 0 and not rank0["nf4"]["in_parameters"]
    assert not rank0["reducer"]["broadcast_buffers"]
    assert rank0["nf4"] == rank1["nf4"] == single["nf4"]["nf4"]  # each process quantised the same base


def check_fsdp_shards_the_frozen_base(runs) -> None:
    multi, _, _ = runs
    for rec in multi["fsdp"]:
        f = rec["fsdp"]
        assert not f["base_requires_grad"] and f["base_local_numel"] * 2 == f["base_numel"]
        assert f["reloaded_equal"]  # the saved folder copied into a fresh sharded model, as resuming does


def check_only_rank_0_writes_the_adapter_folder_and_it_reloads(runs, recipe: str) -> None:
    multi, _, out = runs
    assert [rec["wrote"] for rec in multi[recipe]] == [1, 0]
    folder = out / "multi" / recipe / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(folder))
    saved = load_file(folder / "adapter_model.safetensors")
    for k, v in multi[recipe][0]["adapter"].items():
        assert torch.equal(saved[k], v), k
    model = PeftModel.from_pretrained(D.build_model(SETUP, quantize=recipe == "nf4").unload(), str(folder))
    assert all(torch.equal(t, saved[k]) for k, t in get_peft_model_state_dict(model).items())


def test_rank_batches_of_a_step_make_up_the_one_process_batch() -> None:
    data = D.global_batches(SETUP)
    b, w = SETUP.per_rank_batch, SETUP.world_size
    assert data.shape[0] == SETUP.steps * w * b and D.rows_per_process(SETUP, 1) == w * b
    for step in range(SETUP.steps):
        ranks = torch.cat([data[(step * w + r) * b:(step * w + r + 1) * b] for r in range(w)])
        assert torch.equal(ranks, data[step * w * b:(step + 1) * w * b])
    assert not torch.equal(data[:b], data[b:2 * b])  # the ranks see different rows


def test_bad_launch_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="world_size=2 but nproc=4"):
        D.launch(("trainer",), SETUP, tmp_path, nproc=4)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="trainer_fsdp needs CUDA devices.*torchrun"):
            D.run_recipe("trainer_fsdp", SETUP, tmp_path, world=2)
    with pytest.raises(ValueError, match="unknown recipe 'zero'.*trainer"):
        D.run_recipe("zero", SETUP, tmp_path)
    with pytest.raises(ValueError, match="does not divide"):
        D.rows_per_process(SETUP, 3)
