"""peftlab.lab.exercises: the exercise checker of every chapter."""

from __future__ import annotations

import pytest

from peftlab.lab.exercises import report


def test_report_prints_correct_when_ok(capsys: pytest.CaptureFixture[str]) -> None:
    report(True, "look at the rank")
    assert capsys.readouterr().out == "Correct.\n"


def test_report_raises_with_the_hint_when_not_ok(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AssertionError, match=r"^Not yet: look at the rank$"):
        report(False, "look at the rank")
    assert capsys.readouterr().out == ""


def test_report_accepts_torch_truth_values() -> None:
    import torch

    report(torch.tensor(True), "hint")
    with pytest.raises(AssertionError):
        report(torch.tensor(False), "hint")


def test_report_needs_a_hint() -> None:
    with pytest.raises(TypeError, match="hint must be a non-empty string"):
        report(False, "")
