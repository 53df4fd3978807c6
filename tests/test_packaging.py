"""Every third-party module the package imports at run time is a declared runtime dependency.

The test extras (pytest, pytest-benchmark, pytest-xdist, and whatever they pull in) must not hide a missing one:
the check reads the import statements of the source, not what happens to be importable here.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "protokern").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
FIRST_PARTY = {"protokern"}


def _imported_top_levels(path: Path) -> set[str]:
    """Top-level names of absolute imports in ``path`` (relative imports are first-party)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _declared_runtime_requirements() -> set[str]:
    """Normalised names of the installed protokern's Requires-Dist entries without an extra marker."""
    try:
        requires = metadata.requires("protokern") or []
    except metadata.PackageNotFoundError:
        pytest.skip("protokern is not installed (pip install -e .)")
    names = set()
    for req in requires:
        if "extra ==" in req:
            continue
        names.add(re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_runtime_imports_are_declared():
    modules = set().union(*(_imported_top_levels(p) for p in SOURCES))
    third_party = sorted(m for m in modules if m not in sys.stdlib_module_names and m not in FIRST_PARTY)
    assert "torch" in third_party  # the scan found the package's imports at all
    dists = metadata.packages_distributions()
    declared = _declared_runtime_requirements()
    missing = []
    for module in third_party:
        providers = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not providers & declared:
            missing.append(f"{module} (from {sorted(providers)})")
    assert not missing, f"imported at run time but not in install_requires: {missing}"


def test_setup_declares_what_the_installed_metadata_says():
    """install_requires in setup.py and the installed metadata agree (a stale install would hide a change)."""
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    listed = re.search(r"install_requires=\[(.*?)\]", text, re.S)
    assert listed, "setup.py has no install_requires list"
    in_setup = {re.split(r"[ ;<>=!~\[]", s.strip().strip("\"'"), maxsplit=1)[0].lower()
                for s in listed.group(1).split(",") if s.strip()}
    assert in_setup == _declared_runtime_requirements()


def test_the_sdist_carries_every_extension_source_and_header(tmp_path):
    """A GPU machine builds protokern._C from the sdist: every file the .cu / .cpp sources include is in it,
    also when the sdist is made where no toolkit is found (PROTOKERN_NO_CUDA=1)."""
    import os
    import subprocess
    import tarfile

    env = dict(os.environ, PROTOKERN_NO_CUDA="1")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = listed.stdout
    source = tmp_path / "src"  # the tracked files only: no egg-info of an earlier build to list what to ship
    for name in tracked.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=source, env=env,
                   check=True, capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = [p for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h")]
    included = {m for p in sources for m in re.findall(r'#include\s+"([^"]+)"', p.read_text(encoding="utf-8"))}
    for header in included:
        assert f"csrc/{header}" in names, header
    assert {f"csrc/{p.name}" for p in sources} <= names
    # no tests: setuptools would add tests/test*.py alone, which cannot run without the helpers they import
    assert not [n for n in names if n.startswith("tests/")]


# ---------------------------------------------------------------------------------------------------- layering
# kernels -> op -> ProtoLayer -> model -> push -> prune / explain -> train: a module imports its own layer and those
# below (function-level imports included), and support modules (files, data, pictures, helpers) import only
# support modules. The command lines are applications: they may import anything.
LAYERS = [
    ("kernels", ["protokern.kernels"]),
    ("op", ["protokern.ops", "protokern.backends", "protokern.torch_backend", "protokern._cuda", "protokern._C"]),
    ("layer", ["protokern.layer", "protokern"]),  # (the package itself: exactly, not as a prefix)
    ("model", ["protokern.models", "protokern.losses"]),
    ("push", ["protokern.push"]),
    ("prune, explain", ["protokern.prune", "protokern.explain"]),
    ("train", ["protokern.train"]),
]
SUPPORT = ["protokern.utils", "protokern.cli", "protokern.imaging", "protokern.data", "protokern.checkpoint"]
APPLICATIONS = ["protokern.explain.__main__", "protokern.train"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "protokern")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path) for path in SOURCES}


def _module_exists(name: str) -> bool:
    return name in MODULES


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _rank(name: str) -> int | None:
    """The layer of a module (None for a support module); the longest matching prefix decides."""
    best = (-1, None)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p if p == "protokern" else _within(name, [p])) and len(p) > best[0]:
                best = (len(p), rank)
    for p in SUPPORT:
        if _within(name, [p]) and len(p) > best[0]:
            best = (len(p), None)
    if best[0] < 0:
        raise KeyError(f"{name} is in no layer of LAYERS or SUPPORT: give it its place there")
    return best[1]


def _first_party_imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = node.module or "" if node.level == 0 else ".".join(p for p in (base, node.module) if p)
            if not target.startswith("protokern"):
                continue
            # `from package import module` names a module of the package (`from protokern import ProtoLayer`: the
            # package itself)
            targets = [f"{target}.{a.name}" if _module_exists(f"{target}.{a.name}") else target for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("protokern") and target != module:
                yield node.lineno, target


def _upward_imports(path: Path, module: str) -> list[str]:
    """``file:line (layer) imports target (layer)`` for each import of ``module`` (at ``path``) going up a layer."""
    wrong = []
    rank = _rank(module)
    for line, target in _first_party_imports(path, module):
        target_rank = _rank(target)
        if target_rank is not None and (rank is None or target_rank > rank):  # support modules serve every layer
            below = "support" if rank is None else LAYERS[rank][0]
            wrong.append(f"{path.name}:{line} ({below}) imports {target} ({LAYERS[target_rank][0]})")
    return wrong


def test_no_module_imports_a_layer_above_it():
    """An import going up a layer (a support module reaching the model, push drawing with explain's helpers,
    the checkpoint module rebuilding models) is named with its file and line."""
    wrong = [f"{path.parent.name}/{error}" for path in SOURCES if not _within(_module_name(path), APPLICATIONS)
             for error in _upward_imports(path, _module_name(path))]
    assert not wrong, "\n".join(wrong)
    for path in SOURCES:  # a new module is given its layer (not found in a default one)
        _rank(_module_name(path))


def test_the_layer_rule_sees_an_upward_import(tmp_path):
    """The check above can fail: the upward imports it was written against (function-level, relative) are found."""
    push, checkpoint, ops = tmp_path / "push.py", tmp_path / "checkpoint.py", tmp_path / "ops.py"
    push.write_text("def f():\n    from protokern.explain import render\n")
    checkpoint.write_text("import os\nfrom protokern.models import ProtoPNet\nfrom . import utils\n")
    ops.write_text("from .layer import ProtoLayer\nfrom .kernels import search_bound\n")
    assert _upward_imports(push, "protokern.push") == [
        "push.py:2 (push) imports protokern.explain.render (prune, explain)"]
    assert _upward_imports(checkpoint, "protokern.checkpoint") == [
        "checkpoint.py:2 (support) imports protokern.models (model)"]
    assert _upward_imports(ops, "protokern.ops") == ["ops.py:1 (op) imports protokern.layer (layer)"]
    with pytest.raises(KeyError, match="protokern.newmodule is in no layer"):
        _rank("protokern.newmodule")
