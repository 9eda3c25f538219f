"""Activation patching (exact, batched), attribution patching, and the registered method."""

from .atp import ATP_COMPONENTS, AtpAgreement, AtPResult, atp_agreement, attribution_patch, prefilter_and_verify
from .engine import (
           SWEEPS,
           PatchResult,
           SetPatch,
           compare_contexts,
           ld_metric,
           patch_set,
           patch_sweep,
           run_variants,
           sweep_variants,
)
from .method import Patching, PatchingConfig

__all__ = [
           "ATP_COMPONENTS",
           "SWEEPS",
           "AtPResult",
           "AtpAgreement",
           "PatchResult",
           "Patching",
           "PatchingConfig",
           "SetPatch",
           "atp_agreement",
           "attribution_patch",
           "compare_contexts",
           "ld_metric",
           "patch_set",
           "patch_sweep",
           "prefilter_and_verify",
           "run_variants",
           "sweep_variants",
]
