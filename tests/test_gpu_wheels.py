"""scripts/gpu-wheels.txt, the wheels a lent GPU machine lacks for convzoo-gpu-check: one pinned version each,
every third-party module the tests and the bench import covered, and nothing pinned that no import needs."""

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "scripts" / "gpu-wheels.txt"
# what a lent GPU machine has (the README's "On a new GPU"), by import name
ON_THE_GPU_MACHINE = {"torch", "triton", "pytest", "_pytest", "xdist", "pytest_benchmark", "numpy", "matplotlib"}
# pinned for the install, not for an import: `pip install --no-deps -e .` builds offline with it
FOR_THE_INSTALL = {"setuptools"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name) and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), line
        assert _norm(name) not in out, f"{name} is pinned twice"
        out[_norm(name)] = version
    return out


def _catches_import_error(handler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(getattr(n, "id", "") in ("ImportError", "ModuleNotFoundError") for n in names)


def _optional(node, parents) -> bool:
    """An import inside ``try: ... except ImportError`` (a peer that may be missing)."""
    return any(isinstance(p, ast.Try) and any(map(_catches_import_error, p.handlers)) for p in parents.get(node, ()))


def third_party_imports() -> set[str]:
    """Top-level names the tests, the bench entry and the bench tool import, outside the standard library,
    convzoo and the test folders' own modules; imports guarded by ``except ImportError`` left out."""
    files = [*sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "bench").glob("*.py")),
             *sorted((ROOT / "convzoo" / "tools" / "bench").glob("*.py"))]
    own = {p.stem for p in files} | {"convzoo", "tests", "bench"}
    names = set()
    for path in files:
        tree = ast.parse(path.read_text())
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = [node, *parents.get(node, [])]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            if not _optional(node, parents):
                names |= {m.split(".")[0] for m in mods}
    return {n for n in names if n not in sys.stdlib_module_names and n not in own}


def test_every_line_pins_one_version_of_one_distribution():
    got = pins()
    assert got and all(got.values())


def test_the_pins_cover_every_import_of_the_tests_and_the_bench_and_no_more():
    pinned = pins()
    needed = third_party_imports() - ON_THE_GPU_MACHINE
    dists = importlib.metadata.packages_distributions()
    direct = set()
    for module in sorted(needed):
        provided = {_norm(d) for d in dists.get(module, [])}
        assert provided & set(pinned), f"{module} is imported but no pin provides it ({sorted(provided)})"
        direct |= provided & set(pinned)
    # each other pin must be a declared dependency of a pin the imports need (what their own imports pull in)
    required = set()
    for name in direct:
        for req in importlib.metadata.requires(name) or []:
            if "extra ==" not in req:
                required.add(_norm(re.match(r"[A-Za-z0-9._-]+", req).group(0)))
    unexplained = set(pinned) - direct - required - {_norm(n) for n in FOR_THE_INSTALL}
    assert not unexplained, f"pinned but neither imported nor required by what is: {sorted(unexplained)}"


def test_what_the_imports_load_beyond_the_gpu_machines_packages_is_pinned():
    """Import the modules the tests need after those the GPU machine has: every distribution that adds is pinned
    (e.g. curvlinops loads linear_operator and scipy, not the backpack-for-pytorch it declares)."""
    needed = sorted(third_party_imports() - ON_THE_GPU_MACHINE)
    code = ("import json, sys\nimport torch, triton, numpy, matplotlib, pytest\n"
            "base = {m.split('.')[0] for m in sys.modules}\n"
            + "".join(f"import {m}\n" for m in needed)
            + "import curvlinops.kfac_utils, einconv.expressions\n"  # the submodules the tests take
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} - base)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    dists = importlib.metadata.packages_distributions()
    loaded = {_norm(d) for m in json.loads(run.stdout.splitlines()[-1]) for d in dists.get(m, [])}
    assert loaded - set(pins()) == set()


def test_the_wheel_folder_is_ignored_and_the_script_uses_the_pins():
    script = (ROOT / "scripts" / "download_gpu_wheels.sh").read_text()
    assert "scripts/gpu-wheels.txt" in script and "--no-deps" in script and "--python-version 3.12" in script
    assert "dest=${1:-wheels-gpu}" in script
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    run = subprocess.run(["git", "check-ignore", "-q", "wheels-gpu/x.whl"], cwd=ROOT)
    assert run.returncode == 0, "wheels-gpu/ must be ignored by git"
