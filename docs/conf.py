"""Sphinx configuration of the mechbias documentation site (``make docs``).

Sphinx rather than mkdocs: the API reference comes from autodoc + napoleon over the package's own
docstrings (Google style), the same toolchain TransformerLens and captum use, and myst-parser/myst-nb
read the Markdown pages and the executed quick-start notebook. The pages under ``_generated/`` are
written here at build time from committed files (the public names, the findings tables), so nothing
in them is typed by hand.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "analyses"))

import mechbias

project = "mechbias"
author = "the mechbias authors"
copyright = "the mechbias authors"
release = version = mechbias.__version__

extensions = [
    "sphinx.ext.autodoc",
        "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "upstream", "_generated/*.md", "Thumbs.db", ".DS_Store"]
master_doc = "index"

html_theme = "furo"
html_title = f"mechbias {release}"
html_static_path: list[str] = []

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3
# the quick start is rendered from its committed executed copy (docs/quickstart_executed.ipynb, written by
# analyses/execute_quickstart.py); the build never runs a model
nb_execution_mode = "off"

autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# type hints name many third-party and jaxtyping types that have no documentation page here
nitpicky = False


LAYERS = {"core": "Models, hooks and results", "data": "Contexts, axes, names and prompts",
          "interventions": "Interventions", "eval": "Metrics, statistics and the transfer engine",
          "methods": "Methods", "apps": "The study"}
METHOD_MODULES = ("ig2", "patching", "pruning", "gradiend", "steering", "leace")


def _write_generated() -> None:
    """Write the generated pages: one API page per layer over ``mechbias.__all__``, one per method package,
    and the findings tables (``analyses/data_power.py`` over the committed ``bias.json`` files)."""
    gen = DOCS / "_generated"
    api = gen / "api"
    api.mkdir(parents=True, exist_ok=True)
    by_layer: dict[str, list[str]] = {}
    for name in mechbias.__all__:
        obj = getattr(mechbias, name)
        mod = getattr(obj, "__module__", "") or ""
        layer = mod.split(".")[1] if mod.startswith("mechbias.") else "core"
        by_layer.setdefault(layer, []).append(name)
    pages = []
    for layer, title in LAYERS.items():
        names = sorted(by_layer.pop(layer, []), key=str.lower)
        if not names:
            continue
        body = [title, "=" * len(title), "", f"Exported by ``mechbias`` from ``mechbias.{layer}``.", ""]
        for n in names:
            obj = getattr(mechbias, n)
            kind = "autoclass" if isinstance(obj, type) else "autofunction" if callable(obj) else "autodata"
            body += [f".. {kind}:: mechbias.{n}", ""]
        (api / f"{layer}.rst").write_text("\n".join(body))
        pages.append(layer)
    if by_layer:
        raise RuntimeError(f"public names of no documented layer: {by_layer}")
    for m in METHOD_MODULES:
        title = f"mechbias.methods.{m}"
        (api / f"method_{m}.rst").write_text("\n".join([
            title, "=" * len(title), "", f".. automodule:: mechbias.methods.{m}", "   :members:",
            ""]))
        pages.append(f"method_{m}")
    (gen / "api_pages.md").write_text("```{toctree}\n:maxdepth: 1\n\n"
                                      + "\n".join(f"_generated/api/{p}" for p in pages) + "\n```\n")
    import data_power  # analyses/data_power.py: formats the committed bias.json files

    (gen / "data_power.md").write_text(data_power.tables())
    import support_matrix  # analyses/support_matrix.py: renders the tests' committed support records

    records = json.loads((ROOT / "analyses" / "support_matrix.json").read_text())
    (gen / "support_matrix.md").write_text(support_matrix.render(records) + "\n")



def _config_fields(app, what, name, obj, options, lines) -> None:
    """Config dataclasses document their fields once, in the fields' ``help`` metadata (the command line's
    ``--help`` reads the same text): render them as parameters in the API reference."""
    if what != "class" or not dataclasses.is_dataclass(obj):
        return
    helped = [f for f in dataclasses.fields(obj) if f.metadata.get("help")]
    if helped:
        # the help is plain text: escape what reStructuredText would read as markup
        lines += [""] + [f":param {f.name}: " + f.metadata["help"].replace("\\", "\\\\").replace("|", "\\|")
                         .replace("*", "\\*").replace("`", "\\`") for f in helped]


def setup(app) -> None:
    app.connect("autodoc-process-docstring", _config_fields)


_write_generated()
