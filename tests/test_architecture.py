"""The package's layering holds: no import cycle, no upward import, no hidden imports, hook names in one place."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mechbias"
#: each layer may import only itself and the layers before it
LAYERS = ["core", "viz", "data", "interventions", "eval", "methods", "groundtruth", "apps"]


def _modules():
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (f, is_pkg)
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports():
    """(importing module, imported module, imported names, inside a function?) for every internal import."""
    mods = _modules()
    rows = []
    for m, (f, is_pkg) in mods.items():
        tree = ast.parse(f.read_text(), str(f))
        inside = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(m, is_pkg, node)
                for a in node.names:
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                    if target in mods and target != m:
                        rows.append((m, target, a.name, id(node) in inside))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        rows.append((m, a.name, a.name, id(node) in inside))
    return rows


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    stray = [m for m in _modules() if m != "mechbias" and _layer(m) is None]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_no_upward_imports_and_no_imports_inside_functions():
    bad, hidden = [], []
    for src, dst, _, in_function in _imports():
        if in_function:
            hidden.append(f"{src} -> {dst}")
        if src == "mechbias":
            continue  # the top-level package re-exports everything
        ls, ld = _layer(src), _layer(dst)
        if ld is None or ls is None or ld > ls:
            bad.append(f"{src} ({LAYERS[ls] if ls is not None else '?'}) -> {dst}")
    assert not hidden, f"imports of mechbias modules inside functions: {hidden}"
    assert not bad, f"imports from a higher layer: {bad}"


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    for src, dst, _, _ in _imports():
        edges.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in edges.get(v, ()):
            if state.get(w) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(w):], w]))
            if w not in state:
                visit(w)
        path.pop()
        state[v] = 2

    for v in list(edges):
        if v not in state:
            visit(v)


def test_no_private_names_imported_across_packages():
    bad = [f"{src} imports {name} from {dst}" for src, dst, name, _ in _imports()
           if name.startswith("_") and src.split(".")[:3] != dst.split(".")[:3]]
    assert not bad, bad


def _code_strings(tree):
    """String constants and f-string heads that are not docstrings."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.value
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            yield str(node.values[0].value)


def test_hook_names_are_spelled_only_in_sites_and_installed_only_through_hooked():
    spelled, raw_hooks = [], []
    for f in ROOT.rglob("*.py"):
        rel = str(f.relative_to(ROOT))
        text = f.read_text()
        if rel != "core/sites.py":
            for s in _code_strings(ast.parse(text)):
                if s.startswith("blocks.") or s in ("hook_embed", "unembed.hook_in"):
                    spelled.append(f"{rel}: {s!r}")
        if rel != "core/hooks.py" and ("model.hooks(" in text or "names_filter=" in text):
            raw_hooks.append(rel)
    assert not spelled, f"hook names spelled outside core/sites.py: {spelled}"
    assert not raw_hooks, f"hooks installed or caches read without core.hooks: {raw_hooks}"


def test_architecture_is_documented():
    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    for layer in LAYERS:
        assert f"`{layer}`" in text or f"{layer}/" in text, layer
    assert "(docs/architecture.md)" in (ROOT.parent / "README.md").read_text(), "the README links the architecture"


#: file names that several layers or method packages use for the same kind of thing: a package's init, the
#: abstract base of a layer (``interventions.base``, ``methods.base``) and a method package's registered class
SAME_KIND = {"__init__.py", "base.py", "method.py"}


def same_name_modules(root: Path) -> dict[str, list[str]]:
    """File names used by modules in more than one folder of ``root`` (outside :data:`SAME_KIND`)."""
    seen: dict[str, list[str]] = {}
    for f in sorted(root.rglob("*.py")):
        if f.name not in SAME_KIND:
            seen.setdefault(f.name, []).append(str(f.relative_to(root)))
    return {k: v for k, v in seen.items() if len(v) > 1}


def model_setattrs(root: Path) -> list[str]:
    """``object.__setattr__`` calls on anything but ``self`` (a frozen dataclass's own fields): state stashed on
    a model belongs in :class:`mechbias.core.models.ModelInfo`."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "__setattr__" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "object"
                    and not (node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "self")):
                bad.append(f"{f.relative_to(root)}:{node.lineno}")
    return bad


def test_no_module_name_in_two_folders_and_no_state_set_on_a_model(tmp_path):
    assert same_name_modules(ROOT) == {}
    assert model_setattrs(ROOT) == []
    # the checks find what they look for: a second scoring.py in another layer, a stash on a model
    for folder in ("eval", "groundtruth"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "scoring.py").write_text("x = 1\n")
    (tmp_path / "eval" / "models.py").write_text(
        "def f(model, self=None):\n    object.__setattr__(self, 'a', 1)\n    object.__setattr__(model, 'b', 2)\n")
    assert same_name_modules(tmp_path) == {"scoring.py": ["eval/scoring.py", "groundtruth/scoring.py"]}
    assert model_setattrs(tmp_path) == ["eval/models.py:3"]


def test_string_options_are_literal_types_checked_in_one_place():
    """Every method config's string options are ``Literal`` annotations: one check refuses a value outside them
    with the same message (a tuple field checks each element, None passes where allowed), and the command line
    offers exactly those choices; no config's ``validate`` spells its choices again."""
    import argparse
    import dataclasses
    import inspect
    import typing

    import pytest

    from mechbias.apps.configargs import add_config_arguments
    from mechbias.core.choices import literal_choices
    from mechbias.methods.base import registered_methods
    from mechbias.methods.patching.method import PatchingConfig
    from mechbias.methods.pruning.ranking import PruneConfig
    from mechbias.methods.steering import SteeringConfig

    with pytest.raises(ValueError, match=r"^mode must be one of \('ablate', 'add'\), not 'erase'$"):
        SteeringConfig(mode="erase")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"components must be one of .*, not \['mlp_in'\]"):
        PatchingConfig(components=("heads", "mlp_in"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be one of"):
        PruneConfig(precision="half")  # type: ignore[arg-type]
    assert PruneConfig(score=None).score == "activation"  # None allowed, then resolved
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, SteeringConfig)
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'erase'"):
        parser.parse_args(["--mode", "erase"])
    for cls in registered_methods().values():
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            assert "choices" not in f.metadata, f"{cls.Config.__name__}.{f.name}: choices belong in a Literal"
            if f.name in ("mode", "position", "positions", "apply_positions", "direction", "unit", "params"):
                assert literal_choices(hints[f.name]), f"{cls.Config.__name__}.{f.name} is not a Literal"
        src = inspect.getsource(cls.Config.validate)
        assert " not in (" not in src and "must be one of" not in src, cls.Config.__name__


#: public functions that return an open JSON document (keys not fixed by mechbias), each with its reason;
#: every other public function returns a dataclass, a ``TypedDict`` or a typed mapping ``dict[K, V]``
OPEN_JSON = {
    "make_meta": "a result's metadata block: standard keys plus the caller's settings",
    "model_meta": "make_meta without the creation time",
    "run_tasks": "lm-eval's own results document",
    "planted_manifest": "the planted model's manifest file, read as written",
    "run_summary_json": "a method run's summary.json, read as written",
    "record": "MethodRun's summary.json (its serialisation)",
    "analyze": "a method's own analyses: method-specific keys, written into summary.json",
    "summary": "SetPatch without its per-pair lists (its serialisation)",
    "as_dict": "a record's serialisation",
    "to_dict": "a record's serialisation",
}
_BARE = {"dict", "Dict", "dict[str, Any]", "dict[str, object]", "Dict[str, Any]"}


def public_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    """A module's public functions and the public methods of its public classes."""
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    fns += [m for c in tree.body if isinstance(c, ast.ClassDef) and not c.name.startswith("_")
            for m in c.body if isinstance(m, ast.FunctionDef)]
    return [fn for fn in fns if not fn.name.startswith("_")]


def bare_dict_returns(root: Path) -> list[str]:
    """Public functions and methods (of public classes) that return a bare dict: annotated ``dict``,
    ``dict | None`` or ``dict[str, Any]`` (outside :data:`OPEN_JSON`), or unannotated and returning a dict
    display or comprehension."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        for fn in public_functions(ast.parse(f.read_text(), str(f))):
            where = f"{f.relative_to(root)}:{fn.lineno} {fn.name}"
            if fn.name in OPEN_JSON:
                continue
            if fn.returns is None:
                inner = {id(n) for d in ast.walk(fn) if isinstance(d, (ast.FunctionDef, ast.Lambda)) and d is not fn
                         for n in ast.walk(d)}
                if any(isinstance(n, ast.Return) and isinstance(n.value, (ast.Dict, ast.DictComp))
                       and id(n) not in inner for n in ast.walk(fn)):
                    bad.append(f"{where} -> (unannotated dict)")
                continue
            text = ast.unparse(fn.returns).removesuffix(" | None").removeprefix("None | ")
            if text.startswith("Optional[") and text.endswith("]"):
                text = text[len("Optional["):-1]
            if text in _BARE:
                bad.append(f"{where} -> {ast.unparse(fn.returns)}")
    return bad


def test_public_functions_return_typed_records_not_bare_dicts(tmp_path):
    assert bare_dict_returns(ROOT) == []
    # the check finds each form: annotated dict, dict | None, dict[str, Any], unannotated dict display; a typed
    # mapping, a TypedDict, a private function, a nested helper and an open JSON document pass
    (tmp_path / "m.py").write_text(
        "from typing import Any, TypedDict\n"
        "class Row(TypedDict):\n    a: int\n"
        "def a() -> dict:\n    return {}\n"
        "def b() -> dict | None:\n    return None\n"
        "def c() -> dict[str, Any]:\n    return {}\n"
        "def d():\n    return {'k': 1}\n"
        "class K:\n    def e(self):\n        return {k: 1 for k in 'ab'}\n"
        "def ok1() -> dict[str, int]:\n    return {}\n"
        "def ok2() -> Row:\n    return {'a': 1}\n"
        "def _ok3() -> dict:\n    return {}\n"
        "def ok4() -> list:\n    def inner():\n        return {}\n    return [inner()]\n"
        "def make_meta() -> dict[str, Any]:\n    return {}\n")
    assert bare_dict_returns(tmp_path) == ["m.py:4 a -> dict", "m.py:6 b -> dict | None",
                                           "m.py:8 c -> dict[str, Any]", "m.py:10 d -> (unannotated dict)",
                                           "m.py:13 e -> (unannotated dict)"]


def untyped_signatures(root: Path) -> list[str]:
    """A ``model`` parameter without the ``TransformerBridge`` annotation, anywhere; and a public function whose
    signature holds a bare ``Tensor`` or ``np.ndarray`` (no jaxtyping shape)."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs:
                    if a.arg == "model" and (a.annotation is None
                                             or "TransformerBridge" not in ast.unparse(a.annotation)):
                        bad.append(f"{f.relative_to(root)}:{fn.lineno} {fn.name}(model)")
        for fn in public_functions(tree):
            anns = [a.annotation for a in fn.args.args + fn.args.kwonlyargs if a.annotation is not None]
            for ann in [*anns, *([fn.returns] if fn.returns else [])]:
                for part in ast.unparse(ann).split(" | "):
                    if part in ("Tensor", "torch.Tensor", "np.ndarray"):
                        bad.append(f"{f.relative_to(root)}:{fn.lineno} {fn.name}: {part}")
    return bad


def test_models_are_typed_and_tensors_carry_their_shapes(tmp_path):
    assert untyped_signatures(ROOT) == []
    (tmp_path / "m.py").write_text(
        "from torch import Tensor\n"
        "def a(model, x: Tensor) -> int:\n    return 0\n"
        "def b(model: TransformerBridge, x: Float[Tensor, ' n']) -> Tensor | None:\n    return None\n"
        "def _c(model: TransformerBridge, y: Tensor) -> Tensor:\n    return y\n"
        "def d(m: int) -> dict[str, Tensor]:\n    return {}\n")
    assert untyped_signatures(tmp_path) == ["m.py:2 a(model)", "m.py:2 a: Tensor", "m.py:4 b: Tensor"]
