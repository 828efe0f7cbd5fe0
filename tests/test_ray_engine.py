"""`aqa extract-features --engine ray` against the local engine: same bytes, a killed worker, Ctrl-C and resume.

Each run starts its own Ray instance on 127.0.0.1 (the CLI does, and stops it). Every test gets a Ray temporary
folder of its own (RAY_TMPDIR), so the fixture can find and kill whatever a failed test left running, and only that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from aqa_cli.fileio import TMP_MARK
from aqa_cli.synthetic import moving_scene, write_video
from conftest import REPO, invoke_aqa, run_aqa

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'aqa[ray]'")
pytestmark = pytest.mark.slow

# Frames at 25 fps: 1, 1 and 6 clips. The long one keeps a worker inside `extract` for seconds even on a quiet
# machine, so the kill test always finds one mid-video (with 2 clips a quiet run could end between two polls).
GOOD = {"v0": 40, "v1": 36, "v2": 196}


@pytest.fixture(scope="module")
def videos(tmp_path_factory, i3d) -> Path:
    """Short generated videos, one cut in half (no index: unreadable) and a text file named .mp4."""
    folder = tmp_path_factory.mktemp("videos")
    for k, (stem, frames) in enumerate(GOOD.items()):
        write_video(folder / f"{stem}.mp4", moving_scene(frames, 120, 160, seed=k), 25)
    data = (folder / "v0.mp4").read_bytes()
    (folder / "corrupt.mp4").write_bytes(data[: len(data) // 2])
    (folder / "notes.mp4").write_text("this is not a video\n" * 40)
    return folder


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The local engine's outputs for the same folder."""
    out = tmp_path_factory.mktemp("local")
    res = invoke_aqa("extract-features", videos, "--out", out)
    assert res.returncode == 1, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{e}" for s in GOOD for e in ("npy", "json"))
    return out, res


def _ours(tmpdir: str) -> list[int]:
    """Pids of live processes started under this test's Ray folder (workers inherit RAY_TMPDIR)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"RAY_TMPDIR={tmpdir}".encode() in env.split(b"\0"):
            pids.append(int(proc.name))
    return pids


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture
def ray_env():
    """Environment for one test's runs; whatever they leave running is killed at the end, in a finally."""
    tmpdir = tempfile.mkdtemp(prefix="aqa-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    try:
        yield {"RAY_TMPDIR": tmpdir}
    finally:
        deadline = time.monotonic() + 15
        while _ours(tmpdir) and time.monotonic() < deadline:
            time.sleep(0.2)  # a clean stop needs a moment
        for pid in _ours(tmpdir):
            os.kill(pid, signal.SIGKILL)


def _cli(out: Path, videos: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aqa_cli", "extract-features", str(videos), "--out", str(out), "--engine", "ray",
            *extra]


def _popen(args: list[str], env: dict) -> subprocess.Popen:
    # Ctrl-C's default disposition in the child, as a shell gives it, whatever this test process holds: an ignored
    # SIGINT would be inherited, and Python then keeps ignoring it.
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _failures(text: str) -> list[str]:
    return sorted(line.strip() for line in text.split("Failures:")[-1].splitlines() if line.strip())


def assert_same_as_local(out: Path, reference: tuple[Path, subprocess.CompletedProcess]) -> None:
    local, _ = reference
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local.iterdir())  # nothing partial
    for p in local.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_ray_outputs_are_the_local_engines_byte_for_byte(videos, reference, ray_env, tmp_path):
    out = tmp_path / "ray"
    # One torch thread per worker against the local engine's default count: the bytes still match (README).
    res = run_aqa("extract-features", videos, "--out", out, "--engine", "ray", "--workers", "2",
                  "--threads-per-worker", "1", env=ray_env, timeout=240)
    assert res.returncode == reference[1].returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert "3 extracted, 0 skipped (already complete), 2 failed" in " ".join(res.stdout.split())
    assert _failures(res.stderr) == _failures(reference[1].stderr)
    assert any("notes.mp4: not a readable video" in line for line in _failures(res.stderr))
    assert_same_as_local(out, reference)
    assert _ours(ray_env["RAY_TMPDIR"]) == []  # the instance it started is gone


def test_a_worker_killed_mid_run_changes_nothing(videos, reference, ray_env, tmp_path):
    out = tmp_path / "ray"
    proc = _popen(_cli(out, videos, "--workers", "2", "--batch-size", "1"), ray_env)
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        busy = [pid for pid in _ours(ray_env["RAY_TMPDIR"]) if _title(pid) == "ray::ExtractWorker.extract"]
        if busy:
            time.sleep(0.3)  # inside the video: decoding or the first forward pass
            os.kill(busy[0], signal.SIGKILL)
            killed = busy[0]
        time.sleep(0.05)
    assert killed is not None, "no worker was ever seen extracting"
    assert len(list(out.glob("*.json"))) < len(GOOD)  # killed before the end
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == reference[1].returncode == 1, stderr
    assert f"a Ray worker (pid {killed} on" in " ".join(stderr.split())
    assert "3 extracted, 0 skipped (already complete), 2 failed" in " ".join(stdout.split())
    assert _failures(stderr) == _failures(reference[1].stderr)
    assert_same_as_local(out, reference)


def test_an_interrupted_ray_run_resumes(videos, reference, ray_env, tmp_path):
    out = tmp_path / "ray"
    proc = _popen(_cli(out, videos, "--workers", "1", "--batch-size", "1"), ray_env)
    deadline = time.monotonic() + 180
    while not list(out.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    finished = [p.stem for p in out.glob("*.json")]
    assert 1 <= len(finished) < len(GOOD)
    assert not [p.name for p in out.iterdir() if p.name.startswith(TMP_MARK)]
    deadline = time.monotonic() + 15
    while _ours(ray_env["RAY_TMPDIR"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ours(ray_env["RAY_TMPDIR"]) == []  # workers, raylet and GCS stopped
    first = {stem: (out / f"{stem}.npy").stat().st_mtime_ns for stem in finished}

    res = run_aqa("extract-features", videos, "--out", out, "--engine", "ray", env=ray_env, timeout=240)
    assert res.returncode == 1, res.stderr
    summary = " ".join(res.stdout.split())
    assert f"{len(GOOD) - len(finished)} extracted, {len(finished)} skipped (already complete), 2 failed" in summary
    assert {stem: (out / f"{stem}.npy").stat().st_mtime_ns for stem in finished} == first
    assert_same_as_local(out, reference)


def test_missing_weights_stop_the_run_before_ray_starts(videos, ray_env, tmp_path):
    res = invoke_aqa("extract-features", videos, "--out", tmp_path / "out", "--engine", "ray",
                     env={**ray_env, "AQA_HOME": str(tmp_path / "home"), "AQA_OFFLINE": "1"})
    assert res.returncode == 2
    assert "aqa weights fetch i3d-kinetics400" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (Path(ray_env["RAY_TMPDIR"]) / "ray").exists()  # no Ray instance was started


def test_ray_options_need_the_ray_engine(tmp_path):
    video = write_video(tmp_path / "a.mp4", moving_scene(8, 64, 64), 25)
    res = invoke_aqa("extract-features", video, "--out", tmp_path / "out", "--workers", "2")
    assert res.returncode == 2 and "--workers only apply to --engine ray" in res.stderr


def test_worker_plan_defaults_fit_the_cluster():
    from aqa_cli.errors import AqaError
    from aqa_cli.ray_engine import RayOptions, WorkerPlan, plan_workers

    cpu_box = [{"CPU": 2.0}]
    # CPU workers at the local engine's 2 threads: one worker on 2 cores, not two oversubscribed ones.
    assert plan_workers(RayOptions(), "auto", cpu_box, threads=2) == WorkerPlan(1, 0.0, 1.0, 2)
    assert plan_workers(RayOptions(threads_per_worker=1), "auto", cpu_box, threads=1).workers == 2
    gpu_nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    assert plan_workers(RayOptions(), "auto", gpu_nodes, threads=16) == WorkerPlan(8, 1.0, 1.0, 16)  # one per GPU
    assert plan_workers(RayOptions(gpus_per_worker=0.25), "cuda", gpu_nodes, threads=4).workers == 32
    assert plan_workers(RayOptions(), "cpu", gpu_nodes, threads=16) == WorkerPlan(2, 0.0, 1.0, 16)
    with pytest.raises(AqaError, match="no GPU"):
        plan_workers(RayOptions(), "cuda", cpu_box, threads=2)
    with pytest.raises(AqaError, match="no node of the cluster has"):
        plan_workers(RayOptions(cpus_per_worker=4), "cpu", cpu_box, threads=2)
