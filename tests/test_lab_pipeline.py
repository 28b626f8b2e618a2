"""peftlab.lab.pipeline: reading the drawn digits (accuracy, ink) and blending two style LoRAs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from peftlab import LoraConfig  # noqa: E402
from peftlab.lab import pipeline as pl  # noqa: E402


class _ReadsTheBrightestRow(nn.Module):
    """A stand-in classifier: the digit is the index of the row (of the first 10 pixels) with the most ink."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :10]


def _images_of(digits: list[int]) -> torch.Tensor:
    im = -torch.ones(len(digits), 8, 8)
    for i, d in enumerate(digits):
        im.view(len(digits), 64)[i, d] = 1.0  # one pixel of ink at position d
    return im


def test_digit_accuracy_counts_matches_against_the_labels() -> None:
    images, clf = _images_of([0, 1, 2, 3]), _ReadsTheBrightestRow()
    assert pl.digit_accuracy(images, torch.tensor([0, 1, 2, 3]), clf) == 1.0
    assert pl.digit_accuracy(images, torch.tensor([0, 1, 9, 9]), clf) == 0.5
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        pl.digit_accuracy(images, torch.tensor([0, 1, 2]), clf)


def test_ink_fraction_counts_pixels_above_zero() -> None:
    assert pl.ink_fraction(_images_of([0, 5])) == pytest.approx(1 / 64)
    assert pl.ink_fraction(-_images_of([0, 5])) == pytest.approx(63 / 64)
    assert pl.ink_fraction(torch.zeros(2, 8, 8)) == 0.0  # 0 is neither ink nor paper: not counted


def _pipe_with(names: tuple[str, ...]) -> pl.DigitDiffusionPipeline:
    torch.manual_seed(0)
    pipe = pl.DigitDiffusionPipeline(unet=pl.Denoiser(hidden=32))
    for name in names:
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(pl.UNET_TARGETS),
                                         init_lora_weights=False), adapter_name=name)  # B ≠ 0: a visible style
    return pipe


def _alone(pipe: pl.DigitDiffusionPipeline, name: str, seed: int) -> torch.Tensor:
    pipe.set_adapters(name)
    return pipe([pl.prompt_for(d) for d in range(10)], generator=torch.Generator().manual_seed(seed)).images


def test_blend_ends_are_the_single_loras_and_the_middle_is_neither() -> None:
    pipe = _pipe_with(("a", "b"))
    a, b = _alone(pipe, "a", seed=3), _alone(pipe, "b", seed=3)
    assert not torch.allclose(a, b, atol=1e-3)
    assert pl.blend(pipe, "a", "b", 0.0, seed=3).shape == (10, 8, 8)
    torch.testing.assert_close(pl.blend(pipe, "a", "b", 0.0, seed=3), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(pl.blend(pipe, "a", "b", 1.0, seed=3), b, rtol=0, atol=1e-6)
    middle = pl.blend(pipe, "a", "b", 0.5, seed=3)
    assert not torch.allclose(middle, a, atol=1e-3) and not torch.allclose(middle, b, atol=1e-3)
    assert pipe.get_active_adapters() == ["a", "b"]  # the blend stays active


def test_show_blend_draws_one_row_of_ten_digits_with_the_weights_in_the_title() -> None:
    pipe = _pipe_with(("a", "b"))
    fig = pl.show_blend(pipe, "a", "b", w=0.25, seed=1)
    try:
        assert len(fig.axes) == 10
        assert fig.get_suptitle() == "0.75 × a + 0.25 × b"
        assert [ax.get_title() for ax in fig.axes] == [str(d) for d in range(10)]
    finally:
        plt.close(fig)
