"""The house's one-way flow, read from the sources: no module imports one from a layer above it.

layers → functional → ops → kernels → (autotune, _shapes, reference, _compat); the command-line tools sit on
top and may import anything. Function-level (lazy) imports count as much as module-level ones.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import convzoo

ROOT = Path(convzoo.__file__).parent
# a layer → the top-level convzoo subpackages/modules it must never import (the layers above it)
ABOVE = {
    "autotune": {"kernels", "ops", "functional", "layers", "curvature", "tools"},
    "_shapes": {"kernels", "ops", "functional", "layers", "curvature", "tools", "autotune"},
    "reference": {"kernels", "ops", "functional", "layers", "curvature", "tools"},
    "kernels": {"ops", "functional", "layers", "curvature", "tools"},
    "ops": {"functional", "layers", "curvature", "tools"},
    "functional": {"layers", "curvature", "tools"},
    "layers": {"tools"},
    "curvature": {"tools"},
}


def _imported(tree: ast.AST, package: str) -> set[str]:
    """The top-level convzoo parts (``convzoo.X`` → ``X``) a module's import statements name, at any depth."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module or ""]
                # `from convzoo import kernels` names the part in the imported name
                if node.module == "convzoo":
                    names = [f"convzoo.{a.name}" for a in node.names]
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("convzoo.") and n.count(".") >= 1}
    return out


def _modules(part: str):
    path = ROOT / part
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


@pytest.mark.parametrize("part", sorted(ABOVE))
def test_no_import_from_a_layer_above(part):
    bad = []
    for f in _modules(part):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        package = ".".join(rel.parts[:-1])  # a module's package (an __init__'s own: its folder)
        hits = _imported(ast.parse(f.read_text()), package) & ABOVE[part]
        bad += [f"{rel}: imports convzoo.{h}" for h in sorted(hits)]
    assert bad == []


def test_the_scan_sees_an_upward_import():
    """The scan flags the edge this test exists for (autotune importing kernels), lazy or relative."""
    lazy = ast.parse("def f():\n    import convzoo.kernels as pkg\n")
    relative = ast.parse("from ..kernels import unfold\n")
    named = ast.parse("from convzoo import kernels\n")
    assert _imported(lazy, "convzoo.autotune") == {"kernels"}
    assert _imported(relative, "convzoo.autotune") == {"kernels"}
    assert _imported(named, "convzoo.autotune") == {"kernels"}


def test_a_kernel_name_resolves_before_its_module_is_imported():
    """The registry is filled from below: in a fresh process, asking autotune for a spec whose kernel module is
    not imported yet runs the loader ``convzoo`` added (and a typo is still refused)."""
    code = (
        "import sys, convzoo\n"
        "from convzoo.autotune import config\n"
        "assert 'convzoo.kernels.patches' not in sys.modules and 'extract_patches' not in config.registered()\n"
        "assert config.get_spec('extract_patches').name == 'extract_patches'\n"
        "try:\n    config.get_spec('no_such_kernel')\nexcept ValueError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "unknown kernel 'no_such_kernel'" in out.stdout
