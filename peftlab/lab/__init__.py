"""The lab: profiles, a training loop, tiny models, the lab language model, its tasks, and the digits harnesses.

Experiment helpers are grouped by concept: :mod:`~peftlab.lab.finetune` (one fine-tuning entry point for
every method, and the runs built on it), :mod:`~peftlab.lab.spectra` (how low-rank a weight update is),
:mod:`~peftlab.lab.merging_experiments` (TIES, DARE and adapter merging on the lab's harnesses),
:mod:`~peftlab.lab.gallery` (the update every method learns for the same layer), :mod:`~peftlab.lab.compare`
(every method on one task at a matched budget: one table, a decision guide) and :mod:`~peftlab.lab.timing`
(interleaved latency).

Submodules are imported on demand (``from peftlab.lab import profile``) so that a chapter
that needs only the profile does not pay for transformers or datasets.

Explained in: book/lab.ipynb
"""

__all__ = ["profile", "train", "models", "lm", "tasks", "digits", "finetune", "spectra", "merging_experiments",
           "gallery", "timing", "compare"]
