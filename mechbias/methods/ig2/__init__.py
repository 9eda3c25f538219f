"""IG² (Integrated Gap Gradients) and Bias Neuron Suppression: attribution, units, selection,
verification, and the registered method."""

from .attribution import IG2Result, PromptIG, gap_fn, ig2_prompt, integration_points, run_ig2
from .inputs import Unit, contrast_units, demographic_units
from .method import IG2, IG2Config
from .thresholds import (
           NeuronSelection,
           capability_guard,
           neuron_costs,
           select_neurons,
           selection_overlap,
           top_k_selection,
)
from .verify import VerificationResult, unit_factors, unit_values, verify

__all__ = ["IG2", "IG2Config", "IG2Result", "NeuronSelection", "PromptIG", "Unit", "VerificationResult",
           "capability_guard", "contrast_units", "demographic_units", "gap_fn", "ig2_prompt", "integration_points",
           "neuron_costs", "run_ig2", "select_neurons", "selection_overlap", "top_k_selection", "unit_factors",
           "unit_values", "verify"]
