"""A tiny text-to-digit-image diffusion pipeline, shaped like a diffusers pipeline, for LoRA styles.

``pipe("a drawing of the digit seven")`` returns 8×8 images of sevens. The parts carry diffusers' names:

* ``tokenizer``: words of a small vocabulary (``zero``…``nine``, ``0``…``9``, a few filler words);
* ``text_encoder``: an embedding and a linear layer; the prompt's mean word vector, projected, is the
  condition ``c`` (32 numbers; an empty prompt gives the unconditional ``c``);
* ``unet``: the denoiser, an MLP ε_θ(x_t, t, c) over the 64 pixels (the name is diffusers'; it is no U-Net);
* ``scheduler``: DDPM training noise (100 steps) and a deterministic DDIM sampler with classifier-free
  guidance, ε = ε_θ(x_t, t, ∅) + g·(ε_θ(x_t, t, c) − ε_θ(x_t, t, ∅)).

It is pretrained on scikit-learn's digits (train split, pixels in [−1, 1]) and cached under the lab
cache next to the digits models (:func:`peftlab.lab.cache.cached_module`). :func:`train_style_lora`
trains a LoRA that draws every digit in a style (:data:`STYLES`: inverted, flipped, bold). The pipeline gets diffusers' LoRA calls from
:class:`~peftlab.integrations.diffusers.LoraLoaderMixin`, its models transformers' ``add_adapter`` & co.
from :class:`~peftlab.integrations.transformers.PeftAdapterMixin`. :func:`digit_accuracy` and :func:`ink_fraction`
read what a pipeline drew; :func:`blend` and :func:`show_blend` draw two styles mixed at weights (1 − w, w).

Explained in: book/integrations.ipynb
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from peftlab.integrations.diffusers import LoraLoaderMixin
from peftlab.integrations.transformers import PeftAdapterMixin
from peftlab.lab import cache as _cache
from peftlab.lab import digits as _digits
from peftlab.lab.train import History, train
from peftlab.tuners.lora import LoraConfig

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER_WORDS: tuple[str, ...] = ("a", "the", "of", "digit", "number", "drawing", "picture", "handwritten")
VOCAB: tuple[str, ...] = ("<pad>", "<unk>", *FILLER_WORDS, *NUMBER_WORDS, *"0123456789")
TEMPLATES: tuple[str, ...] = ("{}", "a {}", "the digit {}", "a drawing of the digit {}", "a picture of the number {}",
                              "handwritten {}")
#: every linear layer of the denoiser: the targets of the style LoRAs
UNET_TARGETS: tuple[str, ...] = ("time_proj", "cond_proj", "in_proj", "mid.0", "mid.1", "out_proj")
TEXT_TARGETS: tuple[str, ...] = ("proj",)


def prompt_for(digit: int, template: int = 3) -> str:
    """The prompt of ``TEMPLATES[template]`` for a digit: ``prompt_for(7)`` → "a drawing of the digit seven".

    Explained in: book/integrations.ipynb
    """
    return TEMPLATES[template].format(NUMBER_WORDS[digit])


def _bold(im: Tensor) -> Tensor:
    """Thicker strokes: each pixel takes the darker ink of itself and its left neighbour."""
    shifted = torch.cat([torch.full_like(im[..., :1], -1.0), im[..., :-1]], dim=-1)
    return torch.maximum(im, shifted)


#: style name -> transform of (N, 8, 8) images in [−1, 1] (ink = +1): what each style LoRA learns to draw
STYLES: dict[str, Callable[[Tensor], Tensor]] = {
    "inverted": lambda im: -im,  # ink ↔ paper
    "flipped": lambda im: torch.flip(im, dims=(-1,)),  # mirror left ↔ right
    "bold": _bold,  # strokes one pixel wider
}


# ---------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------
class PromptTokenizer:
    """Whitespace words → ids of :data:`VOCAB` (``<unk>`` for others), padded to ``max_length``.

    Explained in: book/integrations.ipynb
    """

    def __init__(self, max_length: int = 8) -> None:
        self.vocab = {w: i for i, w in enumerate(VOCAB)}
        self.max_length = max_length

    def __call__(self, prompts: Union[str, Sequence[str]]) -> dict[str, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, text in enumerate(prompts):
            words = [self.vocab.get(w, 1) for w in text.lower().split()][: self.max_length]
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class TextEncoder(PeftAdapterMixin, nn.Module):
    """c = proj(mean of the prompt's word embeddings): (B, L) ids → (B, dim). Layers ``embed``, ``proj``.

    Explained in: book/integrations.ipynb
    """

    def __init__(self, vocab_size: int = len(VOCAB), dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.proj.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # empty prompt → 0
        return self.proj(pooled)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps: [cos(t·f_k), sin(t·f_k)], f_k = max_period^(−k/(dim/2)).

    Explained in: book/integrations.ipynb
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Denoiser(PeftAdapterMixin, nn.Module):
    """The "unet": ε_θ(x_t, t, c), an MLP over 64 pixels with residual blocks; (B, 8, 8) → (B, 8, 8).

    e = time_proj(emb(t)) + cond_proj(c); h = in_proj(x) + e; h ← h + mid_i(SiLU(h + e)); ε = out_proj(SiLU(h)).

    Explained in: book/integrations.ipynb
    """

    def __init__(self, pixels: int = 64, cond_dim: int = 32, time_dim: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.in_proj = nn.Linear(pixels, hidden)
        self.time_proj = nn.Linear(time_dim, hidden)
        self.cond_proj = nn.Linear(cond_dim, hidden)
        self.mid = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(2)])
        self.out_proj = nn.Linear(hidden, pixels)

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        x = sample.flatten(1)
        emb = self.time_proj(timestep_embedding(timestep, self.time_dim)) + self.cond_proj(encoder_hidden_states)
        h = self.in_proj(x) + emb
        for layer in self.mid:
            h = h + layer(F.silu(h + emb))  # the condition enters every block
        return self.out_proj(F.silu(h)).view_as(sample)


class DDIMScheduler:
    """DDPM noise for training and a deterministic DDIM sampler (η = 0) with fewer steps.

    ᾱ_t = Π_{s≤t} (1 − β_s), β linear from ``beta_start`` to ``beta_end``; x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε.

    Explained in: book/integrations.ipynb
    """

    def __init__(self, num_train_timesteps: int = 100, beta_start: float = 1e-3, beta_end: float = 0.2) -> None:
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The noisy image of step t: x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε.

        Explained in: book/integrations.ipynb
        """
        ab = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Sample with ``num_inference_steps`` evenly spaced steps out of the training steps, last first.

        Explained in: book/integrations.ipynb
        """
        step = self.num_train_timesteps / num_inference_steps
        self.timesteps = torch.tensor([int(round(step * i)) for i in range(num_inference_steps)][::-1])

    def step(self, eps: Tensor, t: int, t_prev: int, x_t: Tensor) -> Tensor:
        """One DDIM step t → t_prev: x̂₀ = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t (clipped to [−1, 1]), then re-noise to t_prev.

        Explained in: book/integrations.ipynb
        """
        ac = self.alphas_cumprod.to(x_t.device)
        a_t = ac[t]
        a_prev = ac[t_prev] if t_prev >= 0 else torch.ones((), device=x_t.device)
        x0 = ((x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # the noise consistent with the clipped x̂₀
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


@dataclass
class PipelineOutput:
    """What the pipeline returns: ``images`` (N, 8, 8) in [−1, 1], ink = +1.

    Explained in: book/integrations.ipynb
    """

    images: Tensor


class _Components(nn.Module):
    """text_encoder + unet in one module: what is trained and cached together."""

    def __init__(self, text_encoder: TextEncoder, unet: Denoiser) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet


class DigitDiffusionPipeline(LoraLoaderMixin):
    """Text → 8×8 digit images, with diffusers' calls: ``pipe(prompt)``, ``load_lora_weights``,
    ``set_adapters``, ``disable_lora``, ``fuse_lora``, ...

    Explained in: book/integrations.ipynb
    """

    _lora_loadable_modules = ("unet", "text_encoder")

    def __init__(self, text_encoder: Optional[TextEncoder] = None, unet: Optional[Denoiser] = None,
                 tokenizer: Optional[PromptTokenizer] = None, scheduler: Optional[DDIMScheduler] = None) -> None:
        self.text_encoder = text_encoder if text_encoder is not None else TextEncoder()
        self.unet = unet if unet is not None else Denoiser()
        self.tokenizer = tokenizer or PromptTokenizer()
        self.scheduler = scheduler or DDIMScheduler()

    @property
    def device(self) -> torch.device:
        """Where the models are."""
        return self.unet.in_proj.weight.device

    def to(self, device: Union[str, torch.device]) -> DigitDiffusionPipeline:
        """Move both models to ``device``; returns the pipeline."""
        self.text_encoder.to(device)
        self.unet.to(device)
        return self

    def components(self) -> _Components:
        """The two models as one ``nn.Module`` (for an optimizer, or ``state_dict``).

        Explained in: book/integrations.ipynb
        """
        return _Components(self.text_encoder, self.unet)

    def encode_prompt(self, prompts: Union[str, Sequence[str]]) -> Tensor:
        """Condition vectors (B, 32) for prompts (``""`` gives the unconditional one)."""
        batch = self.tokenizer(prompts)
        return self.text_encoder(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))

    @torch.no_grad()
    def __call__(self, prompt: Union[str, Sequence[str]], num_inference_steps: int = 20, guidance_scale: float = 4.0,
                 generator: Optional[torch.Generator] = None, num_images_per_prompt: int = 1,
                 latents: Optional[Tensor] = None) -> PipelineOutput:
        """Draw ``num_images_per_prompt`` images per prompt; the same ``generator`` seed gives the same images.

        Explained in: book/integrations.ipynb
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        was = (self.text_encoder.training, self.unet.training)
        self.text_encoder.eval()
        self.unet.eval()
        try:
            cond = self.encode_prompt(prompts)
            uncond = self.encode_prompt([""] * n)
            if latents is None:
                latents = torch.randn(n, 8, 8, generator=generator)
            x = latents.to(self.device)
            self.scheduler.set_timesteps(num_inference_steps)
            steps = self.scheduler.timesteps.tolist()
            for i, t in enumerate(steps):
                tt = torch.full((n,), t, device=self.device, dtype=torch.long)
                eps_c = self.unet(x, tt, cond)
                eps_u = self.unet(x, tt, uncond)
                eps = eps_u + guidance_scale * (eps_c - eps_u)  # classifier-free guidance
                x = self.scheduler.step(eps, t, steps[i + 1] if i + 1 < len(steps) else -1, x)
        finally:
            self.text_encoder.train(was[0])
            self.unet.train(was[1])
        return PipelineOutput(images=x.clamp(-1, 1).cpu())


# ---------------------------------------------------------------------------------------------------
# Training: the denoising loss, pretraining (cached) and style LoRAs
# ---------------------------------------------------------------------------------------------------
def denoising_batches(images: Tensor, labels: Tensor, batch_size: int = 128, seed: int = 0,
                      p_uncond: float = 0.1) -> Callable[[int], dict]:
    """Step → batch of (image, prompt) pairs, a deterministic function of (seed, step).

    Prompts are drawn from :data:`TEMPLATES` with the digit as a word or a numeral; a fraction ``p_uncond``
    is empty, so the model also learns the unconditional ε_θ(x_t, t, ∅) that guidance needs.

    Explained in: book/integrations.ipynb
    """
    tok = PromptTokenizer()
    # every prompt there is, tokenised once: table[digit, k] for k over (template, word or numeral)
    table = torch.stack([tok([t.format(w) for t in TEMPLATES for w in (NUMBER_WORDS[d], str(d))])["input_ids"]
                         for d in range(10)])  # (10, K, L)
    n_forms = table.shape[1]
    timesteps = DDIMScheduler().num_train_timesteps

    def batch(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(labels), (batch_size,), generator=g)
        ids = table[labels[idx], torch.randint(0, n_forms, (batch_size,), generator=g)]
        ids = ids * (torch.rand(batch_size, 1, generator=g) >= p_uncond)  # empty prompt: all <pad>
        return {"x0": images[idx], "noise": torch.randn(batch_size, 8, 8, generator=g),
                "t": torch.randint(0, timesteps, (batch_size,), generator=g),
                "input_ids": ids, "attention_mask": (ids != 0).long()}

    return batch


def denoising_loss(components: _Components, batch: dict, scheduler: Optional[DDIMScheduler] = None) -> Tensor:
    """DDPM's loss: ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, c)‖² averaged over pixels and batch.

    Explained in: book/integrations.ipynb
    """
    scheduler = scheduler or DDIMScheduler()
    x_t = scheduler.add_noise(batch["x0"], batch["noise"], batch["t"])
    cond = components.text_encoder(batch["input_ids"], batch["attention_mask"])
    return F.mse_loss(components.unet(x_t, batch["t"], cond), batch["noise"])


def _images_and_labels() -> tuple[Tensor, Tensor]:
    split = _digits.load().train
    return split.images(), split.y


def pretrain(steps: int = 4000, lr: float = 2e-3, batch_size: int = 128, seed: int = 0,
             progress: bool = False) -> tuple[DigitDiffusionPipeline, History]:
    """Train text encoder + denoiser from scratch on the digits (AdamW, cosine LR), on the CPU.

    Explained in: book/integrations.ipynb
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = DigitDiffusionPipeline()
    parts = pipe.components()
    images, labels = _images_and_labels()
    opt = torch.optim.AdamW(parts.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    hist = train(parts, denoising_batches(images, labels, batch_size, seed), steps=steps, optimizer=opt,
                 scheduler=sched, loss_fn=denoising_loss, seed=seed, device="cpu", progress=progress)
    return pipe, hist


def load_pipeline(steps: int = 4000, seed: int = 0, device: Union[str, torch.device] = "cpu",
                  progress: bool = False) -> DigitDiffusionPipeline:
    """The pretrained pipeline, from the lab cache (trained and stored on first use: ~20 s of one CPU core).

    Explained in: book/integrations.ipynb
    """
    config = {"harness": "digit-pipeline", "steps": steps, "seed": seed, "lr": 2e-3, "batch_size": 128,
              "vocab": list(VOCAB), "version": 1}

    def build() -> tuple[nn.Module, dict]:
        pipe, hist = pretrain(steps=steps, seed=seed, progress=progress)
        return pipe.components(), {"loss": [round(v, 5) for v in hist.loss[-50:]], "seconds": round(hist.seconds, 2)}

    # trained on the digits' train split, so the digits' data FORMAT is part of the key
    parts, _ = _cache.cached_module("digits", "digit-pipeline", {"format": _digits.FORMAT, **config}, build,
                                    lambda: DigitDiffusionPipeline().components())
    return DigitDiffusionPipeline(parts.text_encoder, parts.unet).to(device)


def train_style_lora(pipe: DigitDiffusionPipeline, style: str, steps: int = 400, r: int = 8, lr: float = 3e-3,
                     batch_size: int = 128, seed: int = 0, adapter_name: Optional[str] = None,
                     text_encoder: bool = False, progress: bool = False) -> History:
    """Add a LoRA named ``adapter_name`` (default: the style) to the denoiser (and the text encoder if asked)
    with ``add_adapter``, and train it to draw every digit in ``style`` (see :data:`STYLES`).

    Only the LoRA trains (r × (in + out) numbers per layer); the pipeline's weights stay as they were.

    Explained in: book/integrations.ipynb
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; styles: {', '.join(STYLES)}")
    name = adapter_name or style
    pipe.unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=list(UNET_TARGETS)), adapter_name=name)
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=list(TEXT_TARGETS)),
                                      adapter_name=name)
    if not text_encoder:
        pipe.text_encoder.requires_grad_(False)  # frozen like the denoiser's base weights
    pipe.set_adapters(name)  # this one alone, weight 1, in every component
    images, labels = _images_and_labels()
    images = STYLES[style](images)
    parts = pipe.components()
    hist = train(parts, denoising_batches(images, labels, batch_size, seed + 1), steps=steps, lr=lr,
                 loss_fn=denoising_loss, seed=seed, progress=progress)
    parts.eval()
    return hist


def classify(images: Tensor, classifier: Optional[nn.Module] = None) -> Tensor:
    """Predicted digit of each (N, 8, 8) image, by the lab's digits classifier (:func:`digits.pretrained_classifier`).

    Explained in: book/integrations.ipynb
    """
    classifier = classifier if classifier is not None else _digits.pretrained_classifier()
    classifier.eval()
    with torch.no_grad():
        return classifier(images.reshape(-1, 64).float().cpu()).argmax(-1)


# ---------------------------------------------------------------------------------------------------
# Reading the images: is the digit right, how much ink, a blend of two styles
# ---------------------------------------------------------------------------------------------------
def digit_accuracy(images: Tensor, labels: Tensor, classifier: Optional[nn.Module] = None) -> float:
    """How often the lab's digits classifier (:func:`classify`) reads ``labels`` (the digits the prompts asked for)
    in (N, 8, 8) ``images``.

    Explained in: book/integrations.ipynb
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if images.reshape(-1, 64).shape[0] != labels.numel():
        raise ValueError(f"digit_accuracy got {images.reshape(-1, 64).shape[0]} images but {labels.numel()} labels; "
                         "give one label per image (the digit its prompt asked for)")
    return (classify(images, classifier) == labels).float().mean().item()


def ink_fraction(images: Tensor) -> float:
    """Fraction of pixels with ink: value > 0 (ink is +1, paper −1).

    Explained in: book/integrations.ipynb
    """
    return (images > 0).float().mean().item()


def blend(pipe: DigitDiffusionPipeline, first: str, second: str, w: float, seed: int = 0) -> Tensor:
    """One image per digit 0…9, (10, 8, 8), drawn with the LoRAs ``first`` and ``second`` at weights (1 − w, w):
    ``pipe.set_adapters([first, second], [1 − w, w])`` (left active), the same starting noise for a given ``seed``.

    Explained in: book/integrations.ipynb
    """
    pipe.set_adapters([first, second], [1 - w, w])
    prompts = [prompt_for(d) for d in range(len(NUMBER_WORDS))]
    return pipe(prompts, generator=torch.Generator().manual_seed(seed)).images


def show_blend(pipe: DigitDiffusionPipeline, first: str = "flipped", second: str = "bold", w: float = 0.5,
               seed: int = 0) -> Any:
    """Draw :func:`blend` as one row of digits with :func:`peftlab.viz.image_grid`; returns the figure. For sliders:
    ``ipywidgets.interactive(lambda first, second, w, seed: show_blend(pipe, first, second, w, seed), first=..., ...)``.

    Explained in: book/integrations.ipynb
    """
    from peftlab import viz  # matplotlib only when drawing

    images = blend(pipe, first, second, w, seed)
    return viz.image_grid(images, col_labels=[str(d) for d in range(len(NUMBER_WORDS))],
                          title=f"{1 - w:.2f} × {first} + {w:.2f} × {second}")
