"""Every third-party module the package imports at run time is a declared runtime dependency.

The test extras (pytest, pytest-benchmark, and whatever they pull in) must not hide a missing one: the check reads
the import statements of the source, not what happens to be importable here.
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
