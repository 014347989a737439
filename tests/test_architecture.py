"""The floor plan (ARCHITECTURE.md), checked on the source with ``ast``.

Layers import in one direction: errors <- spec (vocabulary, no torch) <- primitives <-
runtime <- eval / tuner / models / integrations <- cli; every module sits in one. No
module-level import circle. No import inside a function except where the allowlist below
says why. Each op is one folder with its step model, registered once, with its own test
file; the machinery (compiler, dispatch, fusion) names no op. Every error derives from
AttncomposeError.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
from on_device import triton_unusable

import attncompose as ac
from attncompose.errors import AttncomposeError
from attncompose.primitives import OPS
from attncompose.primitives.dispatch import KERNELS

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "attncompose"

# the layers, bottom up: a module imports from its own layer and those below (a prefix of
# the imported module's name)
ORDER = (
    ("attncompose.errors", "attncompose.version"),
    ("attncompose.spec",),
    ("attncompose.primitives",),
    ("attncompose.runtime",),
    ("attncompose.eval", "attncompose.tuner", "attncompose.models", "attncompose.integrations"),
    ("attncompose.cli",),
)
LAYERS = {
    package: tuple(p for lower in ORDER[: i + 1] for p in lower)
    for i, layer in enumerate(ORDER)
    for package in layer
}
NO_TORCH = ("attncompose.errors", "attncompose.spec")  # and every op's schema.py

# modules (or packages) that import inside functions, and why
FUNCTION_IMPORTS = {
    "attncompose.cli": "a command imports what it runs when it runs: `attncompose --help` "
    "and commands that do not need models, transformers or the tuner stay fast",
    "attncompose.eval.model": "models (transformers) only when a model is evaluated",
    "attncompose.eval.data": "the models package only where a capture is read or its hint "
    "names SmolLM2",
}

# the generic machinery, which must name no op (ops register themselves with it)
MACHINERY = (
    "attncompose.runtime",
    "attncompose.spec",
    "attncompose.primitives.base",
    "attncompose.primitives.dispatch",
    "attncompose.primitives.fusion",
    "attncompose.primitives.plan",
)
# runtime modules that may name the built-in "exact" recipe: tuned files fall back to it
NAMES_THE_EXACT_RECIPE = ("attncompose.runtime.tuned", "attncompose.runtime.model_tuned")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _imported(node: ast.AST) -> list[str]:
    """Modules an import statement loads: ``from pkg import submodule`` loads the submodule."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        subs = [f"{node.module}.{alias.name}" for alias in node.names]
        return [s for s in subs if s in MODULES] or [node.module]
    return []


def _imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    return [(node, name) for node in ast.walk(tree) for name in _imported(node)]


def _top_level_imports(tree: ast.Module) -> list[str]:
    """Imports that run when the module is imported (not under ``if TYPE_CHECKING``)."""
    return [name for node in tree.body for name in _imported(node)]


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_the_layers_below(layer):
    allowed = LAYERS[layer]
    wrong = [
        f"{module}:{node.lineno} imports {name}"
        for module, tree in TREES.items()
        if _in(module, [layer])
        for node, name in _imports(tree)
        if name.startswith("attncompose") and not _in(name, allowed)
        and not (isinstance(node, ast.ImportFrom) and _type_checking_only(tree, node))
    ]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer():
    homeless = [m for m in MODULES if m != "attncompose" and not _in(m, LAYERS)]
    assert not homeless, homeless


def _type_checking_only(tree: ast.Module, node: ast.AST) -> bool:
    """Whether ``node`` sits under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    return any(
        isinstance(stmt, ast.If)
        and getattr(stmt.test, "id", None) == "TYPE_CHECKING"
        and any(sub is node for sub in ast.walk(stmt))
        for stmt in tree.body
    )


def test_the_vocabulary_imports_no_torch():
    """spec imports no torch, and neither does a step model (which imports only spec)."""
    schemas = [m for m in MODULES if _in(m, ["attncompose.primitives"]) and m.endswith(".schema")]
    assert len(schemas) == len(OPS)
    vocabulary = [m for m in MODULES if _in(m, NO_TORCH)] + schemas
    wrong = [
        f"{module} imports {name}"
        for module in vocabulary
        for _, name in _imports(TREES[module])
        if _in(name, ("torch", "triton"))
        or (name.startswith("attncompose") and not _in(name, NO_TORCH))
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_level_import_circle():
    graph = nx.DiGraph()
    for module, tree in TREES.items():
        for name in _top_level_imports(tree):
            if name in MODULES and name != module:
                graph.add_edge(module, name)
    assert list(nx.simple_cycles(graph)) == []


def test_imports_inside_functions_only_where_allowed():
    found = {}
    for module, tree in TREES.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                internal = [n for n in _imported(node) if n.startswith("attncompose")]
                if internal:
                    found.setdefault(module, []).append(f"{module}:{node.lineno} {internal}")
    unexplained = [
        line for m, lines in found.items() if not _in(m, FUNCTION_IMPORTS) for line in lines
    ]
    assert not unexplained, "\n".join(unexplained)
    stale = [m for m in FUNCTION_IMPORTS if not any(_in(f, [m]) for f in found)]
    assert not stale, f"allowlisted modules without function-level imports: {stale}"


def test_the_machinery_names_no_op():
    names = {primitive.op for primitive in OPS} | set(KERNELS)
    named = [
        f"{module}:{node.lineno} {node.value!r}"
        for module, tree in TREES.items()
        if _in(module, MACHINERY) and module not in NAMES_THE_EXACT_RECIPE
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert not named, "\n".join(named)


@pytest.mark.parametrize("primitive", OPS, ids=[p.op for p in OPS])
def test_an_op_is_one_folder_with_its_schema_and_its_tests(primitive):
    folder = f"attncompose.primitives.{primitive.op}"
    assert primitive.__module__ == folder
    assert primitive.schema.__module__ == f"{folder}.schema"
    for kernel in primitive.kernels:
        assert kernel.__module__.startswith(folder + "."), kernel
    for pattern in primitive.fusions:
        assert pattern.__module__.startswith(folder + "."), pattern
    assert (ROOT / "tests" / "primitives" / f"test_{primitive.op}.py").is_file()


@pytest.mark.skipif(triton_unusable() is not None, reason=str(triton_unusable()))
def test_every_kernel_loads():
    for impls in KERNELS.values():
        for kernel in impls:
            assert callable(kernel.load()), kernel.name


def test_import_attncompose_loads_no_kernel_module():
    code = (
        "import sys, attncompose as ac; ac.compile('hyperattention'); "
        "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.') "
        "or m.startswith('attncompose.') and m.endswith(('.triton', '.plan_triton'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_error_derives_from_one_base():
    """``except AttncomposeError`` catches every error the package defines (the CLI's one
    user-error class)."""
    defined = [
        (module, node.name)
        for module, tree in TREES.items()
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception"))
    ]
    assert len(defined) >= 10 and ac.AttncomposeError is AttncomposeError
    wrong = [
        f"{module}.{name}"
        for module, name in defined
        if not issubclass(getattr(importlib.import_module(module), name), AttncomposeError)
    ]
    assert not wrong, wrong
