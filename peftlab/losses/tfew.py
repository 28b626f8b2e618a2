"""The T-Few losses (Liu et al., arXiv 2205.05638, Sec. 3.2) and rank classification, for multiple choice.

A multiple-choice batch holds, for each of N examples, C answer choices written after the same prompt:
``input_ids``/``attention_mask``/``labels`` of shape (N, C, T) (labels -100 outside the answer tokens) and
``label`` (N,), the index of the correct choice. With ℓ_t = log p(y_t | x, y_<t) for the T answer tokens of a
choice (its log-likelihood is Σ_t ℓ_t, its length-normalised score β = (1/T) Σ_t ℓ_t):

* L_LM = −(Σ over the correct choices' tokens of ℓ_t) / (their number of tokens): the usual loss;
* L_UL = −(Σ over the incorrect choices' tokens of log(1 − p_t)) / (their number of tokens): unlikelihood,
  pushing down every token of every wrong answer;
* L_LN = −log softmax(β)[correct], over the C choices: the length-normalised choice scores as logits of a
  classifier (so a long answer is not penalised for having more tokens to pay for);
* T-Few trains on L = L_LM + L_UL + L_LN (no weights), and predicts by **rank classification**: the
  choice with the largest β.

:func:`tfew_loss` computes all three from the model's logits; :class:`TFewLoss` is a ``loss_fn(model,
batch)`` for :func:`peftlab.lab.train.train`; :class:`TFewTrainer` is a :class:`peftlab.Trainer` (a
``transformers.Trainer``) whose ``compute_loss`` uses them.

Explained in: book/ia3.ipynb
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
#: 1 − p is floored here before the log, so a token the model is sure of gives a large finite L_UL term
UL_FLOOR = 1e-6


@dataclass
class TFewLosses:
    """The three losses of one batch, their sum, and the per-choice scores.

    Explained in: book/ia3.ipynb
    """

    lm: torch.Tensor
    ul: torch.Tensor
    ln: torch.Tensor
    total: torch.Tensor
    scores: torch.Tensor  # β, (N, C): length-normalised log-likelihood of each choice


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ_t = log p(label_t) for every position, and the mask of answer positions (labels != -100).

    ``logits`` (B, T, V), ``labels`` (B, T). A causal LM predicts token t from position t − 1 (``shift=True``);
    an encoder-decoder's logits are already aligned with its labels (``shift=False``). Returns (B, T') each.

    Explained in: book/ia3.ipynb
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # log p of each label token
    return picked * mask, mask


def choice_scores(logits: torch.Tensor, labels: torch.Tensor, num_choices: int,
                  shift: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per choice: Σ_t ℓ_t, the number of answer tokens T, and β = Σ_t ℓ_t / T, each (N, C).

    ``logits`` (N·C, T, V) and ``labels`` (N·C, T): choice c of example n in row n·C + c.

    Explained in: book/ia3.ipynb
    """
    logp, mask = token_log_probs(logits, labels, shift)
    total = logp.sum(-1).view(-1, num_choices)
    length = mask.sum(-1).view(-1, num_choices)
    if (length == 0).any():
        raise ValueError("a choice has no answer token (all its labels are -100); every choice needs at least one")
    return total, length, total / length


def rank_classification(scores: torch.Tensor) -> torch.Tensor:
    """The predicted choice of each example: argmax over choices of the length-normalised score β, (N,).

    Explained in: book/ia3.ipynb
    """
    return scores.argmax(-1)


def tfew_loss(logits: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor, num_choices: int,
              shift: bool = True, ul: bool = True, ln: bool = True) -> TFewLosses:
    """L_LM, L_UL and L_LN of a multiple-choice batch and their sum (L_UL/L_LN left out of the sum when
    ``ul``/``ln`` is False; they are still computed, for logging).

    ``logits`` (N·C, T, V), ``labels`` (N·C, T), ``correct`` (N,) the index of the right choice.

    Explained in: book/ia3.ipynb
    """
    logp, mask = token_log_probs(logits, labels, shift)
    n = logp.shape[0] // num_choices
    if logp.shape[0] != n * num_choices or correct.shape != (n,):
        raise ValueError(f"{logp.shape[0]} sequences do not make {num_choices} choices for each of "
                         f"{tuple(correct.shape)} examples; pass rows n·C + c and one correct index per example")
    if not ((correct >= 0) & (correct < num_choices)).all():
        raise ValueError(f"correct indices must be in [0, {num_choices}); got {correct.tolist()}")
    logp, mask = logp.view(n, num_choices, -1), mask.view(n, num_choices, -1)
    is_right = F.one_hot(correct, num_choices).bool().unsqueeze(-1)  # (N, C, 1)
    right, wrong = mask & is_right, mask & ~is_right
    length = mask.sum(-1)
    if (length == 0).any():
        raise ValueError("a choice has no answer token (all its labels are -100); every choice needs at least one")
    # L_LM: mean negative log-likelihood over the correct choices' tokens
    lm = -(logp * right).sum() / right.sum()
    # L_UL: −log(1 − p) over the incorrect choices' tokens, 1 − p = −expm1(ℓ) floored at UL_FLOOR
    one_minus_p = (-torch.expm1(logp)).clamp(min=UL_FLOOR)
    ul_loss = -(torch.log(one_minus_p) * wrong).sum() / wrong.sum().clamp(min=1)
    # L_LN: cross-entropy of the length-normalised scores β against the correct choice
    scores = logp.sum(-1) / length
    ln_loss = F.cross_entropy(scores, correct)
    total = lm + (ul_loss if ul else 0) + (ln_loss if ln else 0)
    return TFewLosses(lm=lm, ul=ul_loss, ln=ln_loss, total=total, scores=scores)


def _flatten_choices(batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """(N, C, T) tensors → (N·C, T) model inputs, the correct indices, and C."""
    if "label" not in batch or batch["input_ids"].dim() != 3:
        raise ValueError("a multiple-choice batch has input_ids/attention_mask/labels of shape (N, C, T) and "
                         "'label' (N,), the index of the correct choice (peftlab.lab.multiple_choice builds one)")
    n, c, t = batch["input_ids"].shape
    inputs = {k: v.reshape(n * c, t) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    return inputs, batch["label"], c


def _seq2seq(model: Any) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def batch_losses(model: Any, batch: Mapping[str, Any], ul: bool = True, ln: bool = True) -> TFewLosses:
    """Run ``model`` on every choice of a multiple-choice batch and return :class:`TFewLosses`.

    Explained in: book/ia3.ipynb
    """
    inputs, correct, c = _flatten_choices(batch)
    labels = inputs.pop("labels")
    seq2seq = _seq2seq(model)
    if seq2seq:
        out = model(**inputs, labels=labels)
    else:
        out = model(**inputs)
    logits = out["logits"] if isinstance(out, Mapping) else out.logits
    return tfew_loss(logits, labels, correct, c, shift=not seq2seq, ul=ul, ln=ln)


class TFewLoss:
    """``loss_fn(model, batch)`` for :func:`peftlab.lab.train.train`: L_LM (+ L_UL) (+ L_LN).

    ``TFewLoss()`` is T-Few's L_LM + L_UL + L_LN; ``TFewLoss(ul=False, ln=False)`` is L_LM alone.

    Explained in: book/ia3.ipynb
    """

    def __init__(self, ul: bool = True, ln: bool = True) -> None:
        self.ul, self.ln = ul, ln

    def __call__(self, model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        return batch_losses(model, batch, self.ul, self.ln).total


@torch.no_grad()
def rank_classification_accuracy(model: Any, batches: Any) -> float:
    """Share of examples whose correct choice has the largest β, over an iterable of multiple-choice batches.

    Explained in: book/ia3.ipynb
    """
    was = model.training
    model.eval()
    hits = total = 0
    try:
        for batch in batches:
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            res = batch_losses(model, batch)
            hits += int((rank_classification(res.scores) == batch["label"]).sum())
            total += int(batch["label"].numel())
    finally:
        model.train(was)
    return hits / total if total else float("nan")


def _trainer_class() -> type:
    from peftlab.trainer import Trainer

    class TFewTrainer(Trainer):
        """:class:`peftlab.Trainer` (a ``transformers.Trainer`` whose checkpoints hold the adapter) whose loss
        is T-Few's L_LM + L_UL + L_LN on multiple-choice batches (``ul=False``/``ln=False`` drop a term). Use
        with ``remove_unused_columns=False`` so ``label`` reaches the loss, and a collator that builds
        (N, C, T) batches.

        Explained in: book/ia3.ipynb
        """

        def __init__(self, *args: Any, ul: bool = True, ln: bool = True, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tfew_ul, self.tfew_ln = ul, ln

        def compute_loss(self, model: Any, inputs: Mapping[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            res = batch_losses(model, inputs, self.tfew_ul, self.tfew_ln)
            return (res.total, {"scores": res.scores}) if return_outputs else res.total

    return TFewTrainer


def __getattr__(name: str) -> Any:  # TFewTrainer is built on first use: importing transformers.Trainer is slow
    if name == "TFewTrainer":
        cls = _trainer_class()
        globals()["TFewTrainer"] = cls
        return cls
    raise AttributeError(name)
