"""peftlab.lab.xlora_experiments: the X-LoRA chapter's helpers, checked against the same numbers by hand."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from peftlab import LoraConfig, XLoraConfig, get_peft_model  # noqa: E402
from peftlab.lab import tasks  # noqa: E402
from peftlab.lab import xlora_experiments as xx  # noqa: E402

TASKS = ["sort", "swap"]


@pytest.fixture
def xlora_lab(load_tiny, tmp_path):
    """An X-LoRA over two random LoRA experts on the tiny lab LM, with a random gate (scalings vary per token)."""
    folders = {}
    for i, t in enumerate(TASKS):
        torch.manual_seed(10 + i)
        expert = get_peft_model(load_tiny()[0], LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
        expert.save_pretrained(tmp_path / t)
        folders[t] = str(tmp_path / t)
    base, tok = load_tiny()
    torch.manual_seed(0)
    model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                                             adapters=folders, xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0,
                                             layerwise_scalings=True)).eval()
    with torch.no_grad():
        for p in model.base_model.internal_xlora_classifier.parameters():
            p.normal_(0, 2.0)
    return model, tok


def test_answer_scalings_average_the_positions_that_predict_the_answer(xlora_lab):
    model, tok = xlora_lab
    ds = tasks.make_task("sort", 3, seed=1, tokenizer=tok)
    got = xx.answer_scalings(model, tok, ds)
    n_layers = model.base_model.internal_xlora_classifier.n_layers
    assert got.shape == (3, n_layers, 2)
    for i in range(3):  # each example alone, without padding: the positions t whose next token is an answer token
        ids, labels = torch.tensor([ds[i]["input_ids"]]), torch.tensor(ds[i]["labels"])
        with torch.no_grad():
            model(input_ids=ids)
        lam = model.get_latest_scalings()[0]
        rows = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
        assert rows and rows[0] > 0
        torch.testing.assert_close(got[i], lam[rows].mean(0), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got[i], lam.mean(0), atol=1e-4)  # the prompt's positions are left out


def test_generation_scalings_are_the_mix_that_chose_each_token(xlora_lab):
    model, tok = xlora_lab
    prompt = tasks.make_task("swap", 1, seed=2)[0]["prompt"]
    answer, steps = xx.generation_scalings(model, tok, prompt, max_new_tokens=4)
    assert answer == tasks.greedy_generate(model, tok, [prompt], max_new_tokens=4)[0]
    ids = torch.tensor([tasks.encode_example(tok, prompt)["input_ids"]])
    full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    n_new = full.shape[1] - ids.shape[1]
    assert steps.shape == (n_new, model.base_model.internal_xlora_classifier.n_layers, 2)
    for k in range(n_new):  # step k: the last position of the forward over the prompt and the first k new tokens
        with torch.no_grad():
            model(input_ids=full[:, :ids.shape[1] + k])
        torch.testing.assert_close(steps[k], model.get_latest_scalings()[0, -1], atol=1e-5, rtol=1e-5)
    assert model.get_scalings_log() == [] and not model.base_model._logging


def test_draw_figure2_rows_are_tokens_or_layers(xlora_lab):
    model, tok = xlora_lab
    examples = {t: tasks.make_task(t, 1, seed=1, tokenizer=tok)[0] for t in TASKS}
    per_example = {t: xx.answer_scalings(model, tok, tasks.make_task(t, 1, seed=1, tokenizer=tok)) for t in TASKS}
    n_layers = model.base_model.internal_xlora_classifier.n_layers
    fig = xx.draw_figure2(model, tok, examples, per_example, TASKS)
    axes = fig.get_axes()
    assert len(axes[0].get_yticks()) == len(examples["sort"]["input_ids"])
    plt.close(fig)
    fig = xx.draw_figure2(model, tok, examples, per_example, TASKS, rows="layers")
    assert len(fig.get_axes()[0].get_yticks()) == n_layers
    bars = [ax for ax in fig.get_axes() if ax.patches][-1]  # the last task's bars: Σ over the layers
    heights = [p.get_height() for p in bars.patches]
    torch.testing.assert_close(torch.tensor(heights, dtype=torch.float32), per_example["swap"][0].sum(0), atol=1e-6, rtol=1e-6)
    plt.close(fig)
    with pytest.raises(ValueError, match="rows='experts'"):
        xx.draw_figure2(model, tok, examples, per_example, TASKS, rows="experts")


def test_scores_batch_and_timing(xlora_lab):
    model, tok = xlora_lab
    tests = {t: tasks.make_task(t, 3, seed=1, tokenizer=tok) for t in TASKS}
    scores = xx.percent_exact_match(model, tok, tests)
    assert scores == {t: 100 * float(tasks.exact_match(model, tok, tests[t])) for t in TASKS}
    batch = xx.timing_batch(tok, tests, per_task=5)  # more than the 3 examples: all of them
    assert batch["input_ids"].shape[0] == 6 and batch["attention_mask"].shape == batch["input_ids"].shape
    assert set(batch) == {"input_ids", "attention_mask"}
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            calls.append(torch.is_grad_enabled())
            return input_ids

    assert xx.forward_seconds(Counting(), batch, repeats=4) > 0
    assert calls == [False] * 5  # one warm-up, four timed, all without gradients
