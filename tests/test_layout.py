"""The package's import graph, drawn from the code with ``ast``: no cycle, imports point down the layers of
docs/design.md ("Layers and import direction"), the two front ends do not import each other, nothing imports the
developer tools, and no runtime module builds a path into the repository.

Every ``import`` counts, also one inside a function (a lazy import only hides a cycle until it runs).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pica_kernels"

#: The layers, lowest first; a module may import its own layer and the layers below it, never one above.
#: The first match (longest prefix) decides. ops/ and svd/ may be single modules or packages (``pica_kernels.svd``
#: and ``pica_kernels.svd.presets`` both match ``pica_kernels.svd``).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("pica_kernels._version", "pica_kernels._C", "pica_kernels.core.errors", "pica_kernels.core.imports",
              "pica_kernels.core.defaults")),
    ("reference", ("pica_kernels.reference",)),
    ("ops, svd", ("pica_kernels.ops", "pica_kernels.svd")),
    ("core", ("pica_kernels.core",)),
    ("front ends", ("pica_kernels.native", "pica_kernels.peft", "pica_kernels.registry_models")),
    ("public API", ("pica_kernels.cache", "pica_kernels")),
]
#: Compiled modules of the package (built by ``make``, absent from a fresh clone): importable, no Python source.
EXTENSIONS = ("pica_kernels._C",)
#: Front ends that must not import each other (each reads the other only through core).
FRONT_ENDS = ("pica_kernels.native", "pica_kernels.peft")
#: Top-level folders of the repository no runtime module may import.
NOT_RUNTIME = ("tools", "benchmarks", "tests", "examples")
#: Names of repository folders: a runtime module that joins one onto a path is writing (or reading) the checkout.
REPOSITORY_DIRS = ("docs", "benchmarks", "tests", "tools", "examples")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if _within(module, p) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best


def modules_of(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every .py file under ``root`` (a package named after its folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of ``known`` and outside top-level names that ``module`` imports (``from p import m`` is an import of
    the module ``p.m`` when it exists, else of ``p``)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(base)
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges between the package's modules, outside top-level packages each module imports)``."""
    files = modules_of(root)
    known = set(files) | {e for e in EXTENSIONS if e.startswith(root.name + ".")}
    inside: dict[str, set[str]] = {}
    outside: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
        inside[name] = {t for t in targets if t in known and t != name}
        outside[name] = {t.split(".")[0] for t in targets if t.split(".")[0] != root.name}
    return inside, outside


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a module list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def direction_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            if layer_of(b) > layer_of(a):
                out.append(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}), a higher layer")
            fa = next((f for f in FRONT_ENDS if _within(a, f)), None)
            fb = next((f for f in FRONT_ENDS if _within(b, f)), None)
            if fa and fb and fa != fb:
                out.append(f"{a} imports {b}: the front ends meet only in core")
    return out


def repository_paths(root: Path) -> list[str]:
    """``file:line`` of every place a runtime module climbs out of the package from ``__file__`` (``.parents[...]``,
    ``.parent.parent``) or joins a repository folder name onto a path (``... / "docs"``)."""
    out = []
    for path in modules_of(root).values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            climbs = (isinstance(node, ast.Attribute) and node.attr == "parents") or (
                isinstance(node, ast.Attribute) and node.attr == "parent"
                and isinstance(node.value, ast.Attribute) and node.value.attr == "parent")
            joins = (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                     and any(isinstance(side, ast.Constant) and side.value in REPOSITORY_DIRS
                             for side in (node.left, node.right)))
            if climbs or joins:
                out.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return out


# ------------------------------------------------------------------ the package
GRAPH, OUTSIDE = import_graph(PACKAGE)


def test_the_graph_is_drawn_from_the_package():
    # The front ends and the core are there, with the edges every reader of the code sees.
    assert {"pica_kernels.native.apply", "pica_kernels.peft.model", "pica_kernels.core.plan"} <= set(GRAPH)
    assert "pica_kernels.core.plan" in GRAPH["pica_kernels.native.apply"]
    assert "pica_kernels.core.plan" in GRAPH["pica_kernels.peft.model"]


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_imports_point_down_the_layers_and_the_front_ends_meet_only_in_core():
    assert direction_violations(GRAPH) == []


def test_nothing_imports_the_developer_tools():
    bad = {m: sorted(OUTSIDE[m] & set(NOT_RUNTIME)) for m in OUTSIDE if OUTSIDE[m] & set(NOT_RUNTIME)}
    assert bad == {}


def test_nothing_in_the_package_builds_a_path_into_the_repository():
    assert repository_paths(PACKAGE) == []


# ------------------------------------------------------------------ the checks themselves
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pica_kernels"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_a_planted_cycle_is_found_also_through_a_lazy_import(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "native/__init__.py": "",
        "native/model.py": "from .report import parameter_report\n",
        "native/report.py": "def parameter_report():\n    from . import model\n",
        "native/layer.py": "from .model import x\n",
    })
    graph, _ = import_graph(root)
    assert cycles(graph) == [["pica_kernels.native.model", "pica_kernels.native.report"]]


@pytest.mark.parametrize(("files", "says"), [
    ({"core/plan.py": "from ..native import apply\n", "native/apply.py": ""}, "a higher layer"),
    ({"reference.py": "from .ops import lowrank\n", "ops/lowrank.py": ""}, "a higher layer"),
    ({"core/errors.py": "from . import plan\n", "core/plan.py": ""}, "a higher layer"),
    ({"native/export.py": "from ..peft.layer import PiCaPeftLinear\n", "peft/layer.py": ""}, "meet only in core"),
])
def test_a_planted_upward_or_cross_import_is_found(tmp_path, files, says):
    root = _package(tmp_path, {"__init__.py": "", "core/__init__.py": "", "native/__init__.py": "",
                               "ops/__init__.py": "", "peft/__init__.py": "", **files})
    graph, _ = import_graph(root)
    assert any(says in v for v in direction_violations(graph)), direction_violations(graph)


def test_a_planted_tool_import_and_repository_path_are_found(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "ops/aot.py": "from pathlib import Path\nimport tools.aot\nDOC = Path(__file__).resolve().parents[3] / 'docs'\n",
    })
    _, outside = import_graph(root)
    assert outside["pica_kernels.ops.aot"] & set(NOT_RUNTIME) == {"tools"}
    assert repository_paths(root) == ["pica_kernels/ops/aot.py:3", "pica_kernels/ops/aot.py:3"]
