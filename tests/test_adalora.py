"""AdaLoRA: the config's refusals, the allocator (schedule, scores, masks, ties), the orthogonality penalty,
files cut to the kept triplets, and the allocation that cannot be forgotten (lab loop, Trainer callback,
the warning). The shared invariants are rows of tests/test_invariants.py; peft interop is in
tests/test_adalora_interop.py.
"""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch
from conftest import base_model, quiet
from torch import nn

import peftlab
from peftlab import AdaLoraConfig, PeftModel, get_peft_model
from peftlab.lab.models import example_inputs
from peftlab.lab.train import train
from peftlab.tuners.adalora import AdaLoraLayer, budget_schedule
from peftlab.tuners.adalora.allocator import keep_top
from peftlab.tuners.adalora.model import GRACE_FORWARDS, orthogonality_penalty


def lm_batch(batch: int = 2) -> dict[str, torch.Tensor]:
    x = dict(example_inputs("llama", batch=batch))
    x["labels"] = x["input_ids"].clone()
    return x


def llama_adalora(**kw) -> PeftModel:
    cfg = dict(target_modules=["q_proj", "v_proj", "down_proj"], init_r=6, target_r=3, tinit=2, tfinal=2,
               total_step=12, task_type="CAUSAL_LM")
    cfg.update(kw)
    torch.manual_seed(0)
    return get_peft_model(base_model("llama"), AdaLoraConfig(**cfg))


def layers(model: PeftModel) -> dict[str, AdaLoraLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, AdaLoraLayer)}


# ---------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(), "total_step=None"),
    (dict(total_step=0), "total_step=0"),
    (dict(total_step=10, target_r=16, init_r=12), r"target_r=16 > init_r=12.*init_r >= 16"),
    (dict(total_step=10, tinit=5, tfinal=5), r"tinit=5 \+ tfinal=5 >= total_step=10"),
    (dict(total_step=10, tinit=9, tfinal=3), "no step is left"),
    (dict(total_step=10, deltaT=0), "deltaT=0"),
    (dict(total_step=10, beta1=1.0), "beta1=1.0"),
    (dict(total_step=10, beta2=0.0), "beta2=0.0"),
    (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight=-1.0"),
    (dict(total_step=10, target_r=0), "target_r=0"),
    (dict(total_step=10, tinit=-1), "tinit=-1"),
    (dict(total_step=10, use_dora=True), "does not support DoRA"),
    (dict(total_step=10, alpha_pattern={"q": 2}), "alpha_pattern"),
    (dict(total_step=10, rank_pattern={"q.lora_E": [True, 2]}), "list of booleans"),
    (dict(total_step=10, lora_dropout=1.0), "lora_dropout=1.0"),
])
def test_config_refuses_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdaLoraConfig(target_modules=["q"], **kwargs)


def test_config_init_weights_and_r():
    with pytest.raises((TypeError, ValueError), match="init_lora_weights='gaussian'"):
        AdaLoraConfig(total_step=10, init_lora_weights="gaussian")
    with pytest.warns(UserWarning, match="r is not used by AdaLoRA.*init_r=12"):
        AdaLoraConfig(total_step=10, r=4)


def test_config_file_takes_peft_lora_keys_at_their_defaults(tmp_path):
    """peft's AdaLoraConfig is a LoraConfig: its file carries every LoRA key. At their defaults they load
    silently and are written back; at another value they are refused, naming the key."""
    peft = pytest.importorskip("peft")
    data = peft.AdaLoraConfig(total_step=10, target_modules=["q"]).to_dict()
    data["peft_type"] = "ADALORA"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = peftlab.PeftConfig.from_dict(json.loads(json.dumps(data, default=sorted)))
    assert isinstance(config, AdaLoraConfig) and config.total_step == 10
    assert set(config.to_dict()) == set(data)
    with pytest.raises(ValueError, match="use_rslora=True"):
        peftlab.PeftConfig.from_dict({**data, "use_rslora": True})


# ---------------------------------------------------------------------------------------------------
# the allocator
# ---------------------------------------------------------------------------------------------------
def test_budget_schedule_values():
    """b₀ = 36, b_T = 18, tinit = 2, tfinal = 2, total_step = 12: flat to step 2, then
    b(t) = ⌊18 + 18·(1 − (t−2)/8)³⌋, the target from step 10 on; masks every deltaT steps inside, always after."""
    kw = dict(init_bgt=36, target_bgt=18, tinit=2, tfinal=2, total_step=12, deltaT=2)
    got = [budget_schedule(t, **kw) for t in range(14)]
    expected_budgets = [36, 36, 36, 30, 25, 22, 20, 18, 18, 18, 18, 18, 18, 18]
    # t=3: 18 + 18·(7/8)³ = 30.06; t=4: 18·(6/8)³ = 7.59 → 25; t=5: 18·(5/8)³ = 4.39 → 22; t=6: 2.25 → 20;
    # t=7: 18·(3/8)³ = 0.95 → 18
    assert [b for b, _ in got] == expected_budgets
    assert [m for _, m in got] == [False, False, False, False, True, False, True, False, True, False, True,
                                   True, True, True]


def test_keep_top_keeps_exactly_the_budget_and_breaks_ties_in_order():
    s = torch.tensor([0.3, 0.1, 0.3, 0.0, 0.3, 0.2])
    assert keep_top(s, 2).tolist() == [True, False, True, False, False, False]  # three tie at 0.3: first two
    assert keep_top(s, 4).tolist() == [True, False, True, False, True, True]
    assert keep_top(torch.zeros(5), 3).tolist() == [True, True, True, False, False]
    assert keep_top(s, 0).sum() == 0 and keep_top(s, 99).all()


def _grads_and_step(model: PeftModel) -> None:
    loss = model(**lm_batch()).loss
    loss.backward()


def test_scores_follow_the_formula():
    """After two updates by hand: Ī and Ū are the EMAs of |w·g| (β₁, β₂), S = s(λ) + mean s(Q) + mean s(P)."""
    model = llama_adalora(beta1=0.7, beta2=0.6)
    for layer in layers(model).values():  # a non-zero Λ, so every tensor has a gradient
        nn.init.normal_(layer.lora_E["default"], std=0.5)
    alloc = model.base_model.allocator("default")
    ema_i, ema_u = {}, {}
    for _ in range(2):
        model.zero_grad()
        _grads_and_step(model)
        alloc.update_ipt()
        for key, layer in alloc.layers:
            for attr in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, attr)["default"]
                ipt = (p * p.grad).abs()
                i_old = ema_i.get((key, attr), torch.zeros_like(p))
                ema_i[key, attr] = 0.7 * i_old + 0.3 * ipt
                ema_u[key, attr] = 0.6 * ema_u.get((key, attr), torch.zeros_like(p)) + \
                    0.4 * (ipt - ema_i[key, attr]).abs()
    scores = alloc.triplet_scores()
    for (key, _), got in zip(alloc.layers, scores):
        s = {a: ema_i[key, a] * ema_u[key, a] for a in ("lora_A", "lora_E", "lora_B")}
        want = s["lora_E"].view(-1) + s["lora_A"].mean(1) + s["lora_B"].mean(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("budget", [0, 5, 17, 36])
def test_mask_keeps_exactly_the_budget_best(budget):
    model = llama_adalora()
    alloc = model.base_model.allocator("default")
    g = torch.Generator().manual_seed(1)
    for layer in layers(model).values():
        nn.init.normal_(layer.lora_E["default"], std=0.5)
    alloc.exp_avg_ipt = [torch.rand(t.shape, generator=g) for t in alloc.tensors()]
    alloc.exp_avg_unc = [torch.rand(t.shape, generator=g) for t in alloc.tensors()]
    scores = torch.cat(alloc.triplet_scores())
    pattern = alloc.mask_to_budget(budget)
    kept = torch.tensor([b for v in pattern.values() for b in v])
    assert int(kept.sum()) == budget
    if 0 < budget < kept.numel():
        assert scores[kept].min() > scores[~kept].max()  # the best ones
    lam = torch.cat([layer.lora_E["default"].view(-1) for _, layer in alloc.layers])
    assert (lam[~kept] == 0).all() and (lam[kept] != 0).all()


def test_ties_keep_the_budget_where_peft_masks_everything():
    """With tinit=0 and no orthogonality penalty the first allocation sees all-zero scores (Λ = 0 gives no gradient
    to P and Q, and |λ·g| = 0). peftlab keeps exactly the budget (ties broken by module order); peft masks every
    triplet whose score equals the threshold, i.e. all of them, and the adapter stays at ΔW = 0 until the next
    allocation."""
    model = llama_adalora(tinit=0, tfinal=0, total_step=12, orth_reg_weight=0.0)
    _grads_and_step(model)
    model.base_model.update_and_allocate(1)
    pattern = model.peft_config["default"].rank_pattern
    budget, _ = model.base_model.allocator("default").budget_schedule(1)
    assert 18 < budget < 36 and sum(map(sum, pattern.values())) == budget
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ref = peft.get_peft_model(base_model("llama"), peft.AdaLoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], init_r=6, target_r=3, total_step=12, orth_reg_weight=0.0,
        task_type="CAUSAL_LM"))
    ref(**lm_batch()).loss.backward()
    ref.base_model.update_and_allocate(1)
    assert sum(map(sum, ref.peft_config["default"].rank_pattern.values())) == 0


def test_update_without_gradients_is_a_clear_error():
    model = llama_adalora()
    with pytest.raises(RuntimeError, match=r"after loss.backward\(\) and before optimizer.zero_grad\(\)"):
        model.base_model.update_and_allocate(0)


def test_final_mask_is_fixed_and_reapplied():
    """At total_step − tfinal the budget is target_r × modules; afterwards Adam may move a masked λ, and each
    later call puts it back to 0."""
    model = llama_adalora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(12):
        _grads_and_step(model)
        opt.step()
        model.base_model.update_and_allocate(step)
        if step == 10:
            final = {k: list(v) for k, v in model.peft_config["default"].rank_pattern.items()}
            assert sum(map(sum, final.values())) == 3 * 6
        opt.zero_grad()
    assert model.peft_config["default"].rank_pattern == final
    for key, layer in layers(model).items():
        mask = torch.tensor(final[f"{key}.lora_E.default"])
        assert (layer.lora_E["default"].view(-1)[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------------
# the orthogonality penalty
# ---------------------------------------------------------------------------------------------------
def test_loss_carries_the_orthogonality_penalty():
    model = llama_adalora(orth_reg_weight=0.3)
    x = lm_batch()
    loss = model(**x).loss
    plain = model.get_base_model()(**x).loss  # Λ = 0: the same model output, without the penalty
    penalties = []
    for layer in layers(model).values():
        q, p = layer.lora_A["default"], layer.lora_B["default"]
        penalties += [torch.linalg.norm(q @ q.T - torch.eye(6)), torch.linalg.norm(p.T @ p - torch.eye(6))]
    torch.testing.assert_close(loss, plain + 0.3 * torch.stack(penalties).mean())
    assert orthogonality_penalty([], "default") == 0.0
    # a rank above a side's size: the same norm from the small Gram matrix (r = 2**20 would need 4 TiB for r × r)
    wide = types.SimpleNamespace(lora_A={"a": torch.randn(9, 4, dtype=torch.float64, requires_grad=True)},
                                 lora_B={"a": torch.randn(5, 9, dtype=torch.float64, requires_grad=True)})
    q, p = wide.lora_A["a"], wide.lora_B["a"]
    got = orthogonality_penalty([wide], "a")
    want = (torch.linalg.norm(q @ q.T - torch.eye(9, dtype=q.dtype)) + torch.linalg.norm(p.T @ p - torch.eye(9, dtype=q.dtype))) / 2
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, [q, p]), torch.autograd.grad(want, [q, p])):
        torch.testing.assert_close(a, b)
    frozen = llama_adalora(orth_reg_weight=0.3, inference_mode=True)
    torch.testing.assert_close(frozen(**x).loss, plain)  # no trainable adapter: no penalty (peft crashes here)


# ---------------------------------------------------------------------------------------------------
# files: cut to the kept triplets, resized on load, rank 0 included
# ---------------------------------------------------------------------------------------------------
def test_save_cuts_to_the_pattern_and_load_resizes(tmp_path):
    model = llama_adalora()
    for layer in layers(model).values():
        nn.init.normal_(layer.lora_E["default"], std=0.5)
    keys = sorted(layers(model))
    pattern = {f"{k}.lora_E.default": [i % (j + 1) == 0 for i in range(6)] for j, k in enumerate(keys)}
    pattern[f"{keys[0]}.lora_E.default"] = [False] * 6  # a module pruned to nothing
    model.peft_config["default"].rank_pattern = pattern
    model.base_model.allocator("default").mask_using_rank_pattern(pattern)
    model.eval()
    x = lm_batch()
    x.pop("labels")
    expected = model(**x).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert saved == {k.removesuffix(".default"): v for k, v in pattern.items()}
    assert model.peft_config["default"].rank_pattern == pattern  # the live config keeps its keys
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for k in keys:
        r = sum(pattern[f"{k}.lora_E.default"])
        assert tensors[f"base_model.model.{k}.lora_E"].shape == (r, 1)
        assert tensors[f"base_model.model.{k}.lora_A"].shape[0] == r
        assert tensors[f"base_model.model.{k}.lora_B"].shape[1] == r
    with quiet():
        loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path)
    assert {k: m.r["default"] for k, m in layers(loaded).items()} == \
        {k: sum(pattern[f"{k}.lora_E.default"]) for k in keys}
    assert layers(loaded)[keys[0]].r["default"] == 0
    torch.testing.assert_close(loaded(**x).logits, expected, atol=1e-6, rtol=0)
    loaded.save_pretrained(tmp_path / "again")  # a resized model saves again unchanged
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


# ---------------------------------------------------------------------------------------------------
# allocation that cannot be forgotten
# ---------------------------------------------------------------------------------------------------
def test_lab_train_allocates_without_being_asked():
    model = llama_adalora()
    x = lm_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, [x], steps=12, lr=1e-2, progress=False)
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(map(sum, pattern.values())) == 3 * 6


def test_training_past_tinit_without_allocation_warns_once():
    model = llama_adalora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2 + GRACE_FORWARDS + 5):
            model(**lm_batch()).loss.backward()
            opt.step()
            opt.zero_grad()
    msgs = [str(w.message) for w in caught if "without any rank allocation" in str(w.message)]
    assert len(msgs) == 1
    assert "update_and_allocate(global_step)" in msgs[0] and "AdaLoraCallback" in msgs[0]
    # evaluation forwards (no grad) never count
    quiet_model = llama_adalora()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            for _ in range(GRACE_FORWARDS + 10):
                quiet_model(**lm_batch())


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        x = example_inputs("llama", batch=n)
        self.ids = x["input_ids"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, tmp_path, callbacks, trainer_class=None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return (trainer_class or Trainer)(model=model, args=args, train_dataset=_Rows(8), callbacks=callbacks)


def test_trainer_callback_allocates(tmp_path):
    """A real transformers.Trainer run (offline, CPU): with the callback the budget reaches target_r × modules;
    without it the model trains a plain LoRA and the warning says so."""
    model = llama_adalora()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without any rank allocation")
        _trainer(model, tmp_path / "a", [peftlab.AdaLoraCallback()]).train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(map(sum, pattern.values())) == 3 * 6
    for key, layer in layers(model).items():
        mask = torch.tensor(pattern[f"{key}.lora_E.default"])
        assert (layer.lora_E["default"].view(-1)[~mask] == 0).all()
    forgotten = llama_adalora(total_step=40, tinit=1, tfinal=1)
    trainer = _trainer(forgotten, tmp_path / "b", [])
    trainer.args.max_steps = 2 + GRACE_FORWARDS + 2
    with pytest.warns(UserWarning, match="without any rank allocation"):
        trainer.train()
    assert forgotten.peft_config["default"].rank_pattern is None


def test_fused_training_node_has_the_right_gradients():
    """SVDLinearFunction (one node for x(W + s·PΛQ)ᵀ + b) against finite differences, every input trained."""
    from peftlab.tuners.adalora.layer import SVDLinearFunction

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64),
               torch.randn(4, generator=g, dtype=torch.float64))
    q, lam, p = (torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 1, generator=g, dtype=torch.float64),
                 torch.randn(4, 3, generator=g, dtype=torch.float64))
    inputs = [t.requires_grad_(True) for t in (x, w, b, q, lam, p)]
    assert torch.autograd.gradcheck(lambda *t: SVDLinearFunction.apply(*t, 0.7), inputs)
    layer = AdaLoraLayer(nn.Linear(5, 4), "a", r=3, init_lora_weights=False).train()
    xs = torch.randn(2, 3, 5)
    assert type(layer(xs).grad_fn).__name__.startswith("SVDLinearFunction")
    with torch.no_grad():
        eager = layer.base_layer(xs) + xs @ layer.get_delta_weight("a").T
    torch.testing.assert_close(layer(xs), eager, atol=1e-5, rtol=0)


def test_peftlab_trainer_allocates_without_a_callback(tmp_path):
    """peftlab.Trainer adds the callback itself (once, even when it is also passed)."""
    model = llama_adalora()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without any rank allocation")
        trainer = _trainer(model, tmp_path, [peftlab.AdaLoraCallback()], trainer_class=peftlab.Trainer)
        assert sum(isinstance(c, peftlab.PeftlabCallback) for c in trainer.callback_handler.callbacks) == 1
        _trainer(model, tmp_path / "b", [], trainer_class=peftlab.Trainer).train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(map(sum, pattern.values())) == 3 * 6


def test_an_absurd_init_r_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"init_r=1099511627776 .*rank at most 32 here, so use init_r <= that"):
        get_peft_model(base_model("llama"), AdaLoraConfig(target_modules=["q_proj"], init_r=2**40, target_r=1,
                                                          total_step=10))
