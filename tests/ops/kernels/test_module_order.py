"""The kernel modules import one another in one direction only, counting imports inside functions too:
launchers -> autotune -> tuned -> configs (and padding), the kernel module by name from launchers alone; no
module of the package imports the developer tools (tools/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pica_kernels
from pica_kernels.ops import kernels

#: What each kernel module may import from its siblings (anything, at module level or inside a function).
ALLOWED = {
    "configs": set(),
    "padding": set(),
    "tuned": {"configs"},
    "autotune": {"configs", "tuned"},
    "launchers": {"configs", "tuned", "autotune", "padding"},
    "lowrank_gemm": {"configs"},
}


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` anywhere in ``path`` names: absolute names as written,
    relative ones as ``.name`` (one leading dot per level), ``from . import a`` as ``.a``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            dots = "." * node.level
            if node.module:
                names.add(dots + node.module)
            else:
                names.update(dots + a.name for a in node.names)
    return names


def _siblings(names: set[str]) -> set[str]:
    """The modules of the same folder among ``names`` (one leading dot)."""
    return {n[1:].split(".")[0] for n in names if n.startswith(".") and not n.startswith("..")}


def test_kernel_modules_import_downwards_only():
    folder = Path(kernels.__file__).parent
    assert set(ALLOWED) == {p.stem for p in folder.glob("*.py")} - {"__init__"}
    for name, allowed in ALLOWED.items():
        got = _siblings(_imports(folder / f"{name}.py"))
        assert got <= allowed, f"ops/kernels/{name}.py imports {sorted(got - allowed)}"


def test_no_package_module_imports_the_tools():
    root = Path(pica_kernels.__file__).parent
    for path in root.rglob("*.py"):
        names = _imports(path)
        assert not any(n == "tools" or n.startswith("tools.") for n in names), path
