"""Training losses beyond the language-modelling one: T-Few's unlikelihood and length-normalised losses.

Explained in: book/ia3.ipynb
"""

from peftlab.losses.tfew import (TFewLoss, TFewLosses, batch_losses, choice_scores, rank_classification,
                                 rank_classification_accuracy, tfew_loss, token_log_probs)

__all__ = ["TFewLoss", "TFewLosses", "batch_losses", "choice_scores", "rank_classification",
           "rank_classification_accuracy", "tfew_loss", "token_log_probs"]
