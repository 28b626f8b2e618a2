"""The exercise checker every chapter uses: one line of feedback, the answer never shown.

Explained in: book/quickstart.ipynb
"""

from __future__ import annotations

__all__ = ["report"]


def report(ok: bool, hint: str) -> None:
    """Print ``Correct.`` when ``ok``; otherwise raise ``AssertionError("Not yet: " + hint)``.

    A chapter's ``check_exercise_N(answer)`` computes ``ok`` from the reader's answer and gives a hint that
    points at the idea without giving the answer away; the error stops a "run all" at the first wrong answer.

    Explained in: book/quickstart.ipynb
    """
    if not isinstance(hint, str) or not hint:
        raise TypeError(f"report(ok, hint): hint must be a non-empty string that helps the reader; got {hint!r}")
    if ok:
        print("Correct.")
    else:
        raise AssertionError("Not yet: " + hint)
