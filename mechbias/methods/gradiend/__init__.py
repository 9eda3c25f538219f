"""GRADIEND (Drechsel & Herbold): feature texts, gradient capture, the one-neuron encoder-decoder,
training, the edit, and the registered method."""

from .edit import (
           ALPHA_GRID,
           H_ALPHAS,
           H_GRID,
           DecoderShare,
           EditChoice,
           HDirection,
           choose_edit,
           decoder_share,
           h_direction,
)
from .gradients import ParamSet, batch_gradient, batch_gradient_pair, param_set
from .method import Gradiend
from .model import ChunkedAdamW, GradiendModel
from .pool import GradientPool, Normalizer, gradient_pool
from .texts import FEATURE_SUFFIX, FeatureText, feature_texts, neutral_feature_texts
from .train import FeatureEvaluation, GradiendConfig, GradiendResult, evaluate_feature, train_gradiend

__all__ = [
           "ALPHA_GRID",
           "FEATURE_SUFFIX",
           "H_ALPHAS",
           "H_GRID",
           "ChunkedAdamW",
           "DecoderShare",
           "EditChoice",
           "FeatureEvaluation",
           "FeatureText",
           "Gradiend",
           "GradiendConfig",
           "GradiendModel",
           "GradiendResult",
           "GradientPool",
           "HDirection",
           "Normalizer",
           "ParamSet",
           "batch_gradient",
           "batch_gradient_pair",
           "choose_edit",
           "decoder_share",
           "evaluate_feature",
           "feature_texts",
           "gradient_pool",
           "h_direction",
           "neutral_feature_texts",
           "param_set",
           "train_gradiend",
]
