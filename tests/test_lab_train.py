"""The training loop: losses fall, only trainable parameters move, evals are recorded."""

import math

import pytest
import torch
import torch.nn as nn

from peftlab.lab.train import History, train


def _data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def test_loss_falls_and_evals_recorded():
    x, y = _data()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    acc = lambda m: (m(x).argmax(-1) == y).float().mean().item()
    h = train(model, [(x, y)], steps=60, lr=1e-2, eval_fn=acc, eval_every=20, progress=False)
    assert h.steps == list(range(1, 61)) and len(h.loss) == 60
    assert h.final_loss(5) < 0.6 * h.loss[0]
    assert [s for s, _ in h.evals["eval"]] == [0, 20, 40, 60]
    assert h.last() > 0.9
    assert h.seconds > 0


def test_same_seed_same_run():
    x, y = _data()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 2))
        runs.append(train(model, [(x, y)], steps=10, seed=5, progress=False).loss)
    assert runs[0] == runs[1]


def test_only_requires_grad_parameters_train():
    x, y = _data()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    frozen = model[0].weight.clone()
    head = model[2].weight.clone()
    train(model, [(x, y)], steps=5, lr=1e-2, progress=False)
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, head)


def test_callable_batches_dict_loss_scheduler_and_clip():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x, labels):
            return {"loss": ((self.lin(x).squeeze(-1) - labels) ** 2).mean()}

    seen = []

    def batch(step):
        seen.append(step)
        x = torch.randn(8, 3)
        return {"x": x, "labels": x.sum(-1)}

    model = M()
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    h = train(model, batch, steps=4, lr=1e-2, scheduler=sched, grad_clip=1.0, progress=False)
    assert seen == [0, 1, 2, 3]
    assert len(h.loss) == 4 and all(math.isfinite(v) for v in h.loss)


def test_iterable_is_cycled():
    x, y = _data(16)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    h = train(nn.Linear(4, 2), data, steps=5, progress=False)
    assert len(h.loss) == 5


def test_history_helpers():
    h = History(steps=[1, 2, 3, 4], loss=[4.0, 2.0, 1.0, 1.0])
    assert h.smoothed(2) == [4.0, 3.0, 1.5, 1.0]
    assert h.final_loss(2) == 1.0
    assert h.steps_to(1.6, window=2) == 3
    assert h.steps_to(0.1) is None
    with pytest.raises(KeyError):
        h.last("acc")


def test_bad_inputs():
    with pytest.raises(ValueError, match="requires_grad"):
        train(nn.Linear(2, 2).requires_grad_(False), [(torch.randn(2, 2), torch.zeros(2).long())], steps=1, progress=False)
    with pytest.raises(TypeError, match="loss_fn"):
        train(nn.Linear(2, 2), ["text"], steps=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train(nn.Linear(2, 2), [], steps=1, progress=False)


def test_model_output_without_loss_is_a_clear_error():
    from peftlab.lab.models import example_inputs, tiny_model

    batch = example_inputs("llama")
    batch.pop("labels")
    with pytest.raises(ValueError, match="labels"):
        train(tiny_model("llama"), [batch], steps=1, progress=False)


# ------------------------------------------------------------------------------------------ per-step hooks


def test_hooks_see_gradients_once_per_step_in_order():
    x, y = _data()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    calls = []

    def before(step, m, loss, opt):
        w = m[0].weight
        assert w.grad is not None and float(w.grad.abs().sum()) > 0  # after backward ...
        calls.append(("backward", step, w.detach().clone(), float(loss), opt))

    def after(step, m, loss, opt):
        w = m[0].weight
        assert w.grad is not None  # ... and still before zero_grad
        calls.append(("step", step, w.detach().clone(), float(loss), opt))

    h = train(model, [(x, y)], steps=3, lr=1e-2, on_backward=before, on_step=[after], progress=False)
    assert [(kind, step) for kind, step, *_ in calls] == [
        ("backward", 0), ("step", 0), ("backward", 1), ("step", 1), ("backward", 2), ("step", 2)]
    for i in range(3):
        _, _, w_before, loss, opt = calls[2 * i]
        _, _, w_after, _, _ = calls[2 * i + 1]
        assert not torch.equal(w_before, w_after)  # the optimizer stepped between the two hooks
        assert loss == pytest.approx(h.loss[i]) and isinstance(opt, torch.optim.AdamW)
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran after the last hook


def test_a_hook_can_change_weights_after_the_step():
    x, y = _data()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def mask(step, m, loss, opt):  # what AdaLoRA's allocation does: zero entries after the optimizer moved them
        with torch.no_grad():
            m[0].weight[:, 0] = 0

    train(model, [(x, y)], steps=5, lr=1e-2, on_step=mask, progress=False)
    assert float(model[0].weight.detach()[:, 0].abs().max()) == 0


def test_hooks_never_stop_training_silently():
    x, y = _data()
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="returned True"):
        train(model, [(x, y)], steps=3, on_backward=lambda *a: True, progress=False)
    with pytest.raises(TypeError, match="callable hook"):
        train(model, [(x, y)], steps=3, on_step=[print, "not a hook"], progress=False)

    def stop(step, m, loss, opt):
        if step == 1:
            raise RuntimeError("stop here")

    seen = []
    with pytest.raises(RuntimeError, match="stop here"):
        train(model, [(x, y)], steps=5, on_step=[lambda s, *a: seen.append(s), stop], progress=False)
    assert seen == [0, 1]


def test_no_hooks_gives_the_same_run():
    x, y = _data()
    runs = []
    for hooks in (None, [lambda *a: None]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2))
        h = train(model, [(x, y)], steps=10, seed=1, on_backward=hooks, on_step=hooks, progress=False)
        runs.append(h.loss)
    assert runs[0] == runs[1]
