"""peftlab.lab.mixed_batches: every adapter on its own rows, the reference for adapter_names=[...]."""

from __future__ import annotations

import pytest
import torch

from peftlab import LoraConfig, get_peft_model
from peftlab.lab.mixed_batches import each_on_its_own_rows
from peftlab.lab.models import MLP


def _two_adapters():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights=False),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["lin0"], init_lora_weights=False))
    return model.eval()


def test_each_row_gets_its_own_adapter_and_the_order_is_kept() -> None:
    model = _two_adapters()
    x = torch.randn(5, 10)
    names = ["b", "a", "__base__", "b", "a"]
    with torch.no_grad():
        out = torch.stack(each_on_its_own_rows(model, {"X": x}, names, lambda sub: model(sub["X"])))
        expected = []
        for i, n in enumerate(names):
            if n == "__base__":
                with model.disable_adapter():
                    expected.append(model(x[i:i + 1])[0])
            else:
                model.set_adapter(n)
                expected.append(model(x[i:i + 1])[0])
        model.set_adapter("a")
        torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=1e-6)
        assert not torch.allclose(expected[0], expected[1]) and not torch.allclose(expected[1], expected[2])
        torch.testing.assert_close(out, model(x, adapter_names=names), rtol=0, atol=1e-5)  # what it checks
    assert model.active_adapter == "a"  # restored


def test_bad_names_and_bad_run_are_refused() -> None:
    model = _two_adapters()
    x = {"X": torch.randn(3, 10)}
    with pytest.raises(ValueError, match="one adapter name per row"):
        each_on_its_own_rows(model, x, ["a", "b"], lambda sub: sub["X"])
    with pytest.raises(ValueError, match=r"\['ghost'\] are not adapters.*'__base__'"):
        each_on_its_own_rows(model, x, ["a", "ghost", "b"], lambda sub: sub["X"])
    with pytest.raises(ValueError, match="one per row"):
        each_on_its_own_rows(model, x, ["a", "a", "b"], lambda sub: [0])
    assert model.active_adapter == "a"
