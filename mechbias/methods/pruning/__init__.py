"""Per-context pruning of neurons, weights and attention heads (Breaking Down Bias): scores, selection,
generalization levels and curves, and the registered method."""

from .levels import LevelsResult, PruningCurve, generalization_levels, pruning_curve
from .method import Pruning
from .ranking import Candidates, PruneConfig, candidates
from .scores import (
                     GroupStats,
                     head_scores,
                     head_stats,
                     input_norms,
                     input_stats,
                     name_positions,
                     neuron_scores,
                     neuron_stats,
                     set_difference,
                     split_norms,
                     wanda_scores,
)

__all__ = ["Candidates", "GroupStats", "LevelsResult", "PruneConfig", "Pruning", "PruningCurve", "candidates",
           "generalization_levels", "head_scores", "head_stats", "input_norms", "input_stats", "name_positions",
           "neuron_scores", "neuron_stats", "pruning_curve", "set_difference", "split_norms",
           "wanda_scores"]
