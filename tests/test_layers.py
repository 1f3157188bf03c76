"""The package's layers (DESIGN.md, "Layout"): every import inside ``fastkd/`` (module-level and
function-level, and ``importlib.import_module`` of a literal name) goes downwards or stays inside its
layer, the import graph has no cycle, and no private name crosses a layer except from ``_core``.

    study, integrations, __main__  ->  public modules  ->  _dispatch  ->  backends
                                   ->  calibration, teacher_cache  ->  _core
"""
import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastkd"

# (layer, rank): a module may import modules of a lower rank, or of its own layer
LAYERS = [
    ("app", 5, ("fastkd.study", "fastkd.integrations", "fastkd.__main__")),
    ("public", 4, ("fastkd", "fastkd.loss", "fastkd.sparse", "fastkd.fused_linear")),
    ("dispatch", 3, ("fastkd._dispatch",)),
    ("backends", 2, ("fastkd.backends",)),
    ("state", 1, ("fastkd.calibration", "fastkd.teacher_cache")),
    ("core", 0, ("fastkd._core",)),
]


def layer_of(module: str):
    """(name, rank) of the layer a module belongs to: the longest matching prefix."""
    best = None
    for name, rank, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + ".") and prefix != "fastkd":
                if best is None or len(prefix) > best[2]:
                    best = (name, rank, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer of DESIGN.md's layout (tests/test_layers.py, LAYERS)")
    return best[:2]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target) -> str:
    if level == 0:
        return target
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(path: Path):
    """(imported module, names imported from it, line) for every import in the file, at any depth."""
    module = module_name(path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module)
            names = [alias.name for alias in node.names]
            # `from . import x`: x may be a submodule
            subs = [f"{target}.{n}" for n in names if (PACKAGE.parent / f"{target}.{n}".replace(".", "/")).exists()
                    or (PACKAGE.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists()]
            found += [(sub, [], node.lineno) for sub in subs]
            rest = [n for n in names if f"{target}.{n}" not in subs]
            if rest:  # `from . import submodule` alone imports the submodule, not the package's names
                found.append((target, rest, node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, [], node.lineno))
    return module, [(target, names, line) for target, names, line in found
                    if target == "fastkd" or target.startswith("fastkd.")]


def _graph():
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module, found = imports_of(path)
        edges[module] = found
    return edges


def _existing(module, edges):
    """The module itself if it is one of the package's, else its nearest package (``fastkd.x.y`` names a
    function or constant of ``fastkd.x``)."""
    while module not in edges and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def test_imports_go_downwards_only():
    edges = _graph()
    wrong = []
    for module, found in edges.items():
        src_layer, src_rank = layer_of(module)
        for target, names, line in found:
            target = _existing(target, edges)
            if target == module or target == "fastkd" and module.startswith("fastkd."):
                continue  # `from fastkd import __version__`-like reads of the package itself are checked below
            dst_layer, dst_rank = layer_of(target)
            if dst_rank > src_rank:
                wrong.append(f"{module} (line {line}, layer {src_layer}) imports {target} (layer {dst_layer}, above it)")
            elif dst_layer != src_layer and dst_layer != "core":
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    wrong.append(f"{module} (line {line}) imports private {private} from {target} across layers")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges = _graph()
    graph = {m: sorted({_existing(t, edges) for t, _, _ in found} - {m, "fastkd"}) for m, found in edges.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph.get(m, ()):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: a function-level upward import and a two-module cycle are found and named."""
    pkg = tmp_path / "fastkd"
    (pkg / "_core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_core" / "__init__.py").write_text("")
    (pkg / "_core" / "spec.py").write_text("def f():\n    from ..loss import kd_loss\n")
    (pkg / "loss.py").write_text("from ._core import spec\nfrom . import sparse\n")
    (pkg / "sparse.py").write_text("import importlib\nimportlib.import_module('fastkd.loss')\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError, match=r"fastkd\._core\.spec \(line 2, layer core\) imports fastkd\.loss"):
        test_imports_go_downwards_only()
    with pytest.raises(AssertionError, match=r"fastkd\.loss -> fastkd\.sparse -> fastkd\.loss"):
        test_no_import_cycle()
