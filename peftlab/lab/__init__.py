"""The lab: profiles, a training loop, tiny models, the lab language model, its tasks, and the digits harnesses.

Experiment helpers are grouped by concept: :mod:`~peftlab.lab.finetune` (one fine-tuning entry point for
every method, and the runs built on it), :mod:`~peftlab.lab.spectra` (how low-rank a weight update is),
:mod:`~peftlab.lab.merging_experiments` (TIES, DARE and adapter merging on the lab's harnesses),
:mod:`~peftlab.lab.gallery` (the update every method learns for the same layer), :mod:`~peftlab.lab.compare`
(every method on one task at a matched budget: one table, a decision guide), :mod:`~peftlab.lab.timing`
(interleaved latency), :mod:`~peftlab.lab.graphs` (the autograd nodes a training step records),
:mod:`~peftlab.lab.fresh_adapter` (a LoRA adapter at step 0: placement, initialisation, the first step), :mod:`~peftlab.lab.merge_checks` (how exactly an adapter folds into its base),
:mod:`~peftlab.lab.product_fits` (what LoRA's, LoHa's and LoKr's products can fit for a budget of parameters),
:mod:`~peftlab.lab.prompt_probes` (a LLaMA-Adapter model's gates and the size of each block's prompt read),
:mod:`~peftlab.lab.rank_allocation` (where AdaLoRA spends its rank budget), :mod:`~peftlab.lab.mixed_batches`
(the one-adapter-at-a-time reference for a mixed batch) and :mod:`~peftlab.lab.exercises` (the chapters'
exercise checker).

Submodules are imported on demand (``from peftlab.lab import profile``) so that a chapter
that needs only the profile does not pay for transformers or datasets.

Explained in: book/lab.ipynb
"""

__all__ = ["profile", "train", "models", "lm", "tasks", "digits", "finetune", "spectra", "merging_experiments",
           "gallery", "timing", "graphs", "compare", "fresh_adapter", "merge_checks", "product_fits",
           "prompt_probes", "rank_allocation", "mixed_batches", "exercises"]
