"""mechbias: find where a language model carries a social bias, remove it, and
measure whether the fix transfers across contexts.

Everything runs on TransformerLens 4 ``TransformerBridge`` hook points. The
default model is the embedded SmolLM2-135M-Instruct (offline).

Quick start::

    import mechbias as mb
    model = mb.load_model()                       # embedded default, offline
    res = mb.measure_bias(model, ["finance", "commerce"], "race")
    res.to_dataframe(); res.plot()
"""

from .contexts import (AlignmentError, Axis, Context, ContextError, Person, PromptSet, list_contexts,
                       load_axis, load_context, load_contexts, make_pairs)
from .hooks import (Compose, HeadIntervention, Identity, Intervention, NeuronIntervention, WeightEdit,
                    WeightMask, hooked, load_intervention)
from .metrics import (BiasResult, contrast_scores, demographic_gap, measure_bias, neutral_texts,
                      perplexity)
from .models import EMBEDDED, ModelLoadError, load_model, tiny_model
from .results import Result, set_seed

__version__ = "0.1.0"

__all__ = [
    "AlignmentError", "Axis", "BiasResult", "Compose", "Context", "ContextError", "EMBEDDED",
    "HeadIntervention", "Identity", "Intervention", "ModelLoadError", "NeuronIntervention", "Person",
    "PromptSet", "Result", "WeightEdit", "WeightMask", "contrast_scores", "demographic_gap", "hooked",
    "list_contexts", "load_axis", "load_context", "load_contexts", "load_intervention", "load_model",
    "make_pairs", "measure_bias", "neutral_texts", "perplexity", "set_seed", "tiny_model",
]
