"""The wheel works where it is installed: it carries the code, the presets and the shipped heads, and scores the demo
from a folder that is not the checkout.

The wheel is built from a copy of the sources (a build in the checkout would leave build/ and *.egg-info there)
and installed without dependencies into a fresh virtual environment that sees this interpreter's site-packages
through a .pth line: the test then costs seconds, not a 6 GB torch install, and ``aqa_cli`` can only come from
the wheel (a .pth path entry does not run the editable install's finder).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SAMPLE = REPO / "samples" / "routine_fall.mp4"


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for folder in ("aqa_cli", "weights"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
          "-q", "-w", str(dist), str(src)])
    (found,) = dist.glob("aqa-*.whl")
    return found


def test_every_package_of_the_source_tree_is_listed_for_the_wheel():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    in_tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "aqa_cli").rglob("__init__.py")}
    assert in_tree - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"


def test_the_weights_registry_imports_no_backbone():
    # The backbone families register their weights in aqa_cli.weights; the arrow points one way only.
    tree = ast.parse((REPO / "aqa_cli" / "weights.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in imported if m and m.startswith("aqa_cli.backbones")}


def test_the_wheel_carries_code_presets_and_every_shipped_head(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {p.relative_to(REPO).as_posix() for p in (REPO / "aqa_cli").rglob("*.py")}
    presets = {p.relative_to(REPO).as_posix() for p in (REPO / "aqa_cli" / "presets").glob("*.toml")}
    heads = {f"aqa_weights/{p.name}" for p in (REPO / "weights").glob("*.safetensors")}
    assert heads and presets
    assert code | presets | heads <= names, sorted((code | presets | heads) - names)[:5]


def test_the_installed_wheel_scores_the_demo_outside_the_checkout(wheel, tmp_path, i3d):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(wheel)])
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # The dependencies (torch, …) from this interpreter's site-packages, after the wheel's own.
    (site / "_aqa_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(SAMPLE, elsewhere / SAMPLE.name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AQA_WEIGHTS_DIR")}
    # Where the code and the heads come from (neither import pulls in torch).
    where = _run([str(python), "-c", "import aqa_cli, importlib.resources as r; print(aqa_cli.__file__); "
                  "print(r.files('aqa_weights'))"], cwd=elsewhere, env=env).stdout.split()
    assert len(where) == 2 and all(Path(p).is_relative_to(site) for p in where), where
    res = _run([str(venv / "bin" / "aqa"), "score", SAMPLE.name, "--preset", "demo"], cwd=elsewhere, env=env)
    assert "/ 10" in res.stdout and "demo" in res.stdout
    version = _run([str(venv / "bin" / "aqa"), "--version"], cwd=elsewhere, env=env)
    assert version.stdout.strip() == f"aqa {wheel.name.split('-')[1]}"  # the wheel's own version
