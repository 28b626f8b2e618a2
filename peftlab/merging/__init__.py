"""Model merging: task arithmetic, TIES, DARE, on tensors, on full-model state dicts and on LoRA adapters.

* :mod:`peftlab.merging.prune` — the steps: trim by magnitude or at random, elect a sign, disjoint merge;
* :mod:`peftlab.merging.methods` — the merge methods on lists of task tensors (peft's ``merge_utils``);
* :mod:`peftlab.merging.state_dicts` — task vectors δ = θ_ft − θ_pre of whole models, merged and added back;
* :mod:`peftlab.merging.lora` — ``add_weighted_adapter``'s eleven combination types, and the cross terms;
* :mod:`peftlab.merging.files` — the same merges on adapter folders and checkpoint files (``python -m peftlab``).

Explained in: book/merging_adapters.ipynb, book/ties.ipynb, book/dare.ipynb
"""

from peftlab.merging.lora import (COMBINATION_TYPES, LoraFactors, add_weighted_adapter, combine_lora_factors,
                                  cross_term_error, cross_terms, factor_weights, svd_factors)
from peftlab.merging.methods import (MERGE_METHODS, dare_linear, dare_ties, magnitude_prune, merge_tensors,
                                     task_arithmetic, ties)
from peftlab.merging.prune import (calculate_majority_sign_mask, disjoint_merge, magnitude_based_pruning, prune,
                                   random_pruning, reshape_weight_task_tensors)
from peftlab.merging.state_dicts import apply_task_vector, merge_state_dicts, merge_task_vectors, task_vector

__all__ = [
    "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "merge_tensors", "MERGE_METHODS",
    "magnitude_based_pruning", "random_pruning", "prune", "calculate_majority_sign_mask", "disjoint_merge",
    "reshape_weight_task_tensors", "task_vector", "apply_task_vector", "merge_task_vectors", "merge_state_dicts",
    "COMBINATION_TYPES", "LoraFactors", "add_weighted_adapter", "combine_lora_factors", "cross_term_error",
    "cross_terms", "factor_weights", "svd_factors",
]
