"""The lab: profiles, a training loop, tiny models, the lab language model, its tasks, and the digits harnesses.

Submodules are imported on demand (``from peftlab.lab import profile``) so that a chapter
that needs only the profile does not pay for transformers or datasets.

Explained in: book/lab.ipynb
"""

__all__ = ["profile", "train", "models", "lm", "tasks", "digits"]
