"""The chapters' GPU sections without a GPU: shipped hub configs, the shrunk models, the profile switch.

``make test`` runs every chapter with ``PEFTLAB_GPU_SIM=1``, so each "On a GPU (Colab)" cell runs on a shrunk
copy of its hub models; these tests check the pieces that makes of, and that no GPU cell bypasses them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
import torch

from peftlab import LoraConfig, TaskType, get_peft_model
from peftlab.lab import hub, profile

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def _config(repo: str) -> dict:
    return json.loads((hub.shipped_folder(repo) / "config.json").read_text())


# ---- the shipped configs are the real ones: they give the notes' parameter counts ----------------
@pytest.mark.parametrize("repo, total", [
    ("facebook/opt-350m", 331_196_416),          # 332,769,280 all params − 1,572,864 LoRA (the notes)
    ("HuggingFaceTB/SmolLM2-135M", 134_515_008),  # the model card's count
])
def test_shipped_config_builds_the_real_model_size(repo: str, total: int) -> None:
    import transformers

    cfg = _config(repo)
    with torch.device("meta"):
        model = getattr(transformers, cfg["architectures"][0])(transformers.AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in model.parameters()) == total


def test_shipped_mt0_config_gives_the_notes_trainable_count() -> None:
    import transformers

    cfg = _config("bigscience/mt0-large")
    with torch.device("meta"):
        model = transformers.MT5ForConditionalGeneration(transformers.AutoConfig.for_model(**cfg))
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=32))
    assert peft_model.get_nb_trainable_parameters()[0] == 2_359_296


# ---- shrinking keeps the architecture ---------------------------------------------------------------
@pytest.mark.parametrize("repo", [r for r in hub.shipped_repos() if (hub.shipped_folder(r) / "config.json").exists()])
def test_shrink_config_keeps_the_architecture_at_lab_size(repo: str) -> None:
    import transformers

    full = _config(repo)
    small = hub.shrink_config(full, vocab_size=100)
    assert small["architectures"] == full["architectures"] and small["model_type"] == full["model_type"]
    for key in ("num_hidden_layers", "num_layers", "num_decoder_layers"):
        if key in full:
            assert small[key] == hub.SIM_LAYERS
    if "num_key_value_heads" in full:  # grouped-query attention keeps its ratio
        assert (small["num_attention_heads"] // small["num_key_value_heads"]
                == full["num_attention_heads"] // full["num_key_value_heads"])
    if "word_embed_proj_dim" in full:  # OPT-350m's projection in/out of the embedding stays
        assert (small["word_embed_proj_dim"] != small["hidden_size"]) == (full["word_embed_proj_dim"] != full["hidden_size"])
    model = getattr(transformers, small["architectures"][0])(transformers.AutoConfig.for_model(**small))
    assert sum(p.numel() for p in model.parameters()) < 500_000  # the real ones: 10^8 and more
    assert model.get_input_embeddings().weight.shape[0] == 100


def test_unknown_repo_is_refused_with_the_shipped_list() -> None:
    with pytest.raises(ValueError, match=r"no shipped config for hub repository 'org/nope'.*facebook/opt-350m"):
        hub.simulated_repo("org/nope")


def test_sim_tokenizer_encodes_any_text_and_round_trips() -> None:
    tok = hub.sim_tokenizer()
    for text in ("Hello, my name is", "sort 3 1 2 =", "Grüße, 你好"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


def test_simulated_repos_load_like_the_hub_and_are_deterministic() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab import PeftModel

    folder = hub.simulated_repo("facebook/opt-350m")
    assert hub.simulated_repo("facebook/opt-350m") == folder  # built once per process
    a = AutoModelForCausalLM.from_pretrained(folder)
    b = AutoModelForCausalLM.from_pretrained(folder)
    assert hub.is_simulated(a) and type(a).__name__ == "OPTForCausalLM"
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["Hello World"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)
    adapter = hub.simulated_repo("ybelkada/opt-350m-lora")
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    with pytest.raises(ValueError, match="allow_pickle=False"):
        PeftModel.from_pretrained(b, adapter, allow_pickle=False)
    with pytest.warns(UserWarning, match="enable_lora"):
        lora = PeftModel.from_pretrained(b, adapter, allow_pickle=True)
    with torch.no_grad():
        assert not torch.equal(lora(**batch).logits, a(**batch).logits)


# ---- the profile switch ---------------------------------------------------------------------------------
def test_gpu_sim_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(profile.ENV_GPU_SIM, raising=False)
    smoke = profile.get("smoke")
    assert not smoke.gpu_sections and smoke.hub("facebook/opt-350m") == "facebook/opt-350m"
    monkeypatch.setenv(profile.ENV_GPU_SIM, "1")
    sim = profile.get("smoke")
    assert sim.gpu_sections and sim.gpu_sim and Path(sim.hub("facebook/opt-350m")).is_dir()
    sim.synchronize()  # a no-op on the CPU
    monkeypatch.setenv(profile.ENV_GPU_SIM, "maybe")
    with pytest.raises(ValueError, match="PEFTLAB_GPU_SIM='maybe'"):
        profile.get("smoke")


def test_training_a_simulated_model_uses_bf16_autocast_like_the_gpu() -> None:
    from transformers import AutoModelForCausalLM

    from peftlab.lab.train import train

    model = AutoModelForCausalLM.from_pretrained(hub.simulated_repo("HuggingFaceTB/SmolLM2-135M"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(torch.is_autocast_enabled("cpu")))
    ids = torch.randint(4, 100, (2, 8))
    train(model, [{"input_ids": ids, "labels": ids}], steps=2, device="cpu", progress=False)
    assert seen and all(seen)


# ---- no GPU cell bypasses the switch ----------------------------------------------------------------------
HUB_ID = re.compile(r"""from_pretrained\(\s*["'][\w.-]+/[\w.-]+["']""")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_gpu_cells_go_through_the_profile(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    in_gpu_section = False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            headings = [ln for ln in cell.source.splitlines() if ln.startswith("#")]
            if headings:
                in_gpu_section = "On a GPU" in headings[-1]
            continue
        src = cell.source
        assert not HUB_ID.search(src), (
            f"{path.name}: a hub id passed to from_pretrained directly; wrap it in P.hub(...) so the simulated "
            f"GPU run can build it: {HUB_ID.search(src).group(0)}")
        if in_gpu_section:
            assert src.startswith("if P.gpu_sections:"), (
                f"{path.name}: a cell of the 'On a GPU' section that make test would skip; open it with "
                f"`if P.gpu_sections:` (the gpu profile, or PEFTLAB_GPU_SIM=1)")
            assert 'P.name == "gpu"' not in src.split("\n", 1)[0]
