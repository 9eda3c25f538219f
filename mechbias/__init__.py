"""mechbias: find where a language model carries a social bias, remove it, and
measure whether the fix transfers across contexts.

Everything runs on TransformerLens 4 ``TransformerBridge`` hook points. The
default model is the embedded SmolLM2-135M-Instruct (offline).

The package is layered; each layer imports only the layers before it
(see docs/architecture.md)::

    core -> viz -> data -> interventions -> eval -> methods -> groundtruth -> apps

Quick start::

    import mechbias as mb
    model = mb.load_model()                       # embedded default, offline
    res = mb.measure_bias(model, ["finance", "commerce"], "race")
    res.to_dataframe(); res.plot()
"""

from .core.hooks import HookNameError, hooked, n_active_hooks
from .core.log import log_to_console
from .core.models import EMBEDDED, ModelLoadError, load_model
from .core.testing import tiny_model
from .core.results import Result, set_seed
from .core.sites import Site
from .data.axes import Axis, ContextError, Person, load_axis
from .data.prompts import PromptSet
from .data.contexts import Context, list_contexts, load_context, load_contexts
from .data.pairs import AlignmentError, make_pairs
from .data.neutral import neutral_texts
from .interventions.base import Compose, Identity, Intervention, load_intervention, register_intervention
from .interventions.units import HeadIntervention, NeuronIntervention
from .interventions.weights import WeightEdit, WeightMask
from .eval.metrics import BiasResult, contrast_scores, demographic_gap, favoured_group, measure_bias, perplexity
from .eval.cells import Cell, EvalSet, TransferConfig, evaluate
from .eval.transfer import TransferMatrix, transfer_matrix
from .eval.crossfit import CrossFit, crossfit_matrix
from .methods.base import Method, MethodConfig, Selection, get_method, register_method, registered_methods
from . import methods as _methods  # noqa: F401  (registers every method)
from . import groundtruth as _groundtruth  # noqa: F401
from .groundtruth import delta as _delta, planted as _planted, recovery as _recovery  # noqa: F401  (registers the planted models; result types)
from .apps.study import StudyConfig, StudyResult, run_study
from .apps.workflow import MethodRun, load_run

__version__ = "0.2.0"

__all__ = [
    "EMBEDDED",
    "AlignmentError",
    "Axis",
    "BiasResult",
    "Cell",
    "Compose",
    "Context",
    "ContextError",
    "CrossFit",
    "EvalSet",
    "HeadIntervention",
    "HookNameError",
    "Identity",
    "Intervention",
    "Method",
    "MethodConfig",
    "MethodRun",
    "ModelLoadError",
    "NeuronIntervention",
    "Person",
    "PromptSet",
    "Result",
    "Selection",
    "Site",
    "StudyConfig",
    "StudyResult",
    "TransferConfig",
    "TransferMatrix",
    "WeightEdit",
    "WeightMask",
    "contrast_scores",
    "crossfit_matrix",
    "demographic_gap",
    "evaluate",
    "favoured_group",
    "get_method",
    "hooked",
    "list_contexts",
    "load_axis",
    "load_context",
    "load_contexts",
    "load_intervention",
    "load_model",
    "load_run",
    "log_to_console",
    "make_pairs",
    "measure_bias",
    "n_active_hooks",
    "neutral_texts",
    "perplexity",
    "register_intervention",
    "register_method",
    "registered_methods",
    "run_study",
    "set_seed",
    "tiny_model",
    "transfer_matrix",
]
