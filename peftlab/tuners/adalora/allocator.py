"""AdaLoRA's rank allocator: importance scores for every triplet, a budget that shrinks, and the mask.

Per parameter entry w (of P, Λ and Q), after each backward (arXiv 2303.10512, eqs. 8–11):

* sensitivity I = |w · ∂L/∂w|;
* smoothed sensitivity Ī ← β₁ Ī + (1 − β₁) I;
* uncertainty Ū ← β₂ Ū + (1 − β₂) |I − Ī|;
* score s = Ī · Ū.

Triplet i of a module scores S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji). The budget b(t) (the number of
triplets kept over all modules) is the total at first, b₀ = Σ r₀; after ``tinit`` steps it falls as a cubic to
b_T = ``target_r`` × modules, which it reaches at ``total_step - tfinal``:

    b(t) = b_T + (b₀ − b_T) · (1 − (t − tinit) / (total_step − tfinal − tinit))³.

Every ``deltaT`` steps the b(t) best-scored triplets keep their λ and the others get λ = 0. At
``total_step - tfinal`` the mask is fixed (the final mask) and re-applied after every later step.

Differences from peft 0.21.2, on purpose: exactly b(t) triplets are kept when scores tie (peft masks every
triplet whose score equals the threshold, so all-zero scores at step 0 mask everything); the update is done
with a handful of fused ``torch._foreach`` operations over all tensors; a missing gradient is a clear error.

Explained in: book/adalora.ipynb
"""

from __future__ import annotations

from typing import Any

import torch


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    deltaT: int) -> tuple[int, bool]:  # noqa: N803 (peft's name)
    """(budget, whether to mask at this step) at ``step``: peft's cubic schedule.

    Explained in: book/adalora.ipynb
    """
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * mul**3 + target_bgt), step % deltaT == 0


def keep_top(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """A bool mask keeping exactly ``min(budget, len(scores))`` highest scores; ties go to the earlier entry.

    Explained in: book/adalora.ipynb
    """
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if budget > 0:
        order = torch.sort(scores, descending=True, stable=True).indices
        keep[order[:budget]] = True
    return keep


class RankAllocator:
    """Scores, budget and masks for one adapter's triplets in a list of AdaLoRA layers.

    ``layers`` is a list of (module path, layer); the tensors are read from the layers at every call, so a
    resized layer is followed (its statistics restart).

    Explained in: book/adalora.ipynb
    """

    def __init__(self, config: Any, layers: list[tuple[str, Any]], adapter_name: str) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.layers = sorted(layers, key=lambda kv: kv[0])  # peft ranks modules by name
        self.init_bgt = sum(layer.r[adapter_name] for _, layer in self.layers)
        self.target_bgt = config.target_r * len(self.layers)
        self.final_mask: dict[str, torch.Tensor] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the smoothed sensitivities and uncertainties."""
        self.exp_avg_ipt: list[torch.Tensor] = []
        self.exp_avg_unc: list[torch.Tensor] = []

    def tensors(self) -> list[torch.Tensor]:
        """Q, Λ, P of every layer, in that order, layer by layer."""
        name = self.adapter_name
        return [t for _, layer in self.layers for t in (layer.lora_A[name], layer.lora_E[name], layer.lora_B[name])]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, self.init_bgt, self.target_bgt, c.tinit, c.tfinal, c.total_step, c.deltaT)

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Ī ← β₁Ī + (1−β₁)|w·g|, Ū ← β₂Ū + (1−β₂)|I − Ī| for every entry of every tensor (fused)."""
        params = self.tensors()
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            raise RuntimeError(
                "update_and_allocate found no gradient on the AdaLoRA tensors: call it after loss.backward() and "
                "before optimizer.zero_grad() (peftlab's training loop and AdaLoraCallback do)")
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        shapes = [p.shape for p in params]
        if [t.shape for t in self.exp_avg_ipt] != shapes:  # first call, or a layer was resized
            self.exp_avg_ipt = [torch.zeros_like(p) for p in params]
            self.exp_avg_unc = [torch.zeros_like(p) for p in params]
        b1, b2 = self.config.beta1, self.config.beta2
        torch._foreach_mul_(self.exp_avg_ipt, b1)
        torch._foreach_add_(self.exp_avg_ipt, ipt, alpha=1 - b1)
        torch._foreach_sub_(ipt, self.exp_avg_ipt)  # I − Ī (in place: I is not needed any more)
        torch._foreach_abs_(ipt)
        torch._foreach_mul_(self.exp_avg_unc, b2)
        torch._foreach_add_(self.exp_avg_unc, ipt, alpha=1 - b2)

    @torch.no_grad()
    def triplet_scores(self) -> list[torch.Tensor]:
        """S_i = s(λ_i) + mean s(Q_i·) + mean s(P_·i) per layer, with s = Ī·Ū (zeros before any update)."""
        if not self.exp_avg_ipt:
            return [torch.zeros(layer.r[self.adapter_name]) for _, layer in self.layers]
        s = torch._foreach_mul(self.exp_avg_ipt, self.exp_avg_unc)
        out = []
        for i in range(len(self.layers)):
            q, lam, p = s[3 * i], s[3 * i + 1], s[3 * i + 2]
            out.append(lam.view(-1) + (q.mean(dim=1) + p.mean(dim=0)))
        return out

    def _pattern(self, masks: list[torch.Tensor]) -> dict[str, list[bool]]:
        return {f"{key}.lora_E.{self.adapter_name}": m.tolist() for (key, _), m in zip(self.layers, masks)}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Keep the ``budget`` best triplets over all layers, zero the others' λ; returns the rank pattern."""
        scores = self.triplet_scores()
        sizes = [s.numel() for s in scores]
        keep = keep_top(torch.cat(scores).float(), budget).split(sizes) if sizes else []
        masks = [k.view(-1) for k in keep]
        self._apply(masks)
        return self._pattern(masks)

    def _apply(self, masks: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for (_, layer), m in zip(self.layers, masks):
                lam = layer.lora_E[self.adapter_name]
                lam.masked_fill_(~m.to(lam.device).view(-1, 1), 0.0)

    def finalize(self) -> dict[str, list[bool]]:
        """The final mask (budget ``target_r`` × modules), kept for the remaining steps; statistics reset."""
        pattern = self.mask_to_budget(self.target_bgt)
        self.final_mask = {k: torch.tensor(v, dtype=torch.bool) for k, v in pattern.items()}
        self.reset_ipt()
        return pattern

    def mask_using_rank_pattern(self, rank_pattern: dict[str, Any]) -> None:
        """Zero λ of every triplet the (final) rank pattern drops; keys with or without the adapter name."""
        suffix = f".{self.adapter_name}"
        plain = {(k[: -len(suffix)] if k.endswith(suffix) else k): v for k, v in rank_pattern.items()}
        masks = []
        for key, layer in self.layers:
            mask = plain.get(f"{key}.lora_E")
            if mask is None:
                raise KeyError(f"the rank pattern has no entry for {key}.lora_E; it was made for another model")
            masks.append(torch.as_tensor(mask, dtype=torch.bool))
        self._apply(masks)
