"""``PeftWarning``: the category of peft's own warnings (a ``UserWarning``), so filters written for peft work.

Explained in: book/peft_differences.md
"""


class PeftWarning(UserWarning):
    """A warning about how an adapter is used (peft's ``peft.PeftWarning``)."""
