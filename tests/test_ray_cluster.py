"""`aqa extract-features --engine ray --address` on a two-node cluster with token authentication, one node lost.

The cluster is what docs/scale-out.md tells an operator to start (`ray start --head`, then `ray start --address`
on a second node, every process with RAY_AUTH_MODE=token and one RAY_AUTH_TOKEN), here as two nodes on one machine,
every server bound to 127.0.0.1. The second node's raylet is killed while its worker is inside a video: the driver
hands that video to the head's worker and every output comes out byte-identical to the local engine's. Whatever the
test started is killed in a finally (every process carrying this test's RAY_TMPDIR), never anything else.

Two nodes on one machine need one detail that real nodes do not: on Linux `ray start` swaps 127.0.0.1 for the
machine's routable address (and then binds every interface). The head keeps 127.0.0.1 with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as does the driver; a worker node refuses that setting, so the second node runs
Ray's own `ray start` entry point with the swap turned off (see ``_SECOND_NODE``).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from aqa_cli.synthetic import moving_scene, write_video
from conftest import REPO, invoke_aqa
from test_ray_engine import _title

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'aqa[ray]'")

# Frames at 25 fps: 6, 1 and 1 clips (largest first: the head's worker, usually ready first, takes the long one).
VIDEOS = {"long": 196, "a": 40, "b": 36}
RAY_CLI = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
_SECOND_NODE = [sys.executable, "-c", "import sys, ray._private.services as s; "
                "s.resolve_ip_for_localhost = lambda h: h; from ray.scripts.scripts import main; "
                "sys.argv[0] = 'ray'; main()"]
LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 and ::ffff:127.0.0.1 in /proc/net


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(tmpdir: str, marker: str = "") -> list[int]:
    """Pids of live processes carrying this test's RAY_TMPDIR (and ``marker``, NAME=VALUE, when given)."""
    wanted = {f"RAY_TMPDIR={tmpdir}".encode()} | ({marker.encode()} if marker else set())
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
            if (proc / "stat").read_text().split(")")[-1].split()[0] == "Z":
                continue  # a zombie is already dead
        except OSError:
            continue
        if wanted <= env:
            pids.append(int(proc.name))
    return pids


def _listening(pids: list[int]) -> list[str]:
    """host:port (as /proc/net writes it) of every TCP socket these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return found


def _wait_for(log: Path, text: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"`ray start` exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"`ray start` did not finish in time: {log.read_text()[-2000:]}")


@pytest.fixture
def cluster(tmp_path):
    """A head and a second node on 127.0.0.1 with token authentication: (address, env for every process, tmpdir)."""
    tmpdir = tempfile.mkdtemp(prefix="aqa-rc-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    port = _free_port()
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # The GCS declares a silent node dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s).
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    started: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 120
        head_log = tmp_path / "head.log"
        started.append(subprocess.Popen(
            [*RAY_CLI, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--include-dashboard", "false", *common], env=env, stdout=head_log.open("w"),
            stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for(head_log, "Ray runtime started", started[0], deadline)
        node_log = tmp_path / "node.log"
        started.append(subprocess.Popen(
            [*_SECOND_NODE, "start", "--address", f"127.0.0.1:{port}", *common],
            env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "AQA_TEST_NODE": "second"},
            stdout=node_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for(node_log, "Ray runtime started", started[1], deadline)
        yield f"127.0.0.1:{port}", env, tmpdir
    finally:
        for proc in started:
            with_group = proc.poll() is None
            if with_group:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in _ours(tmpdir):  # what left the process groups (Ray's workers start sessions of their own)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in started:
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _ours(tmpdir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ours(tmpdir) == [], "the cluster outlived the test"  # stopped: nothing of it is left running


@pytest.mark.slow
def test_a_lost_node_changes_no_output(cluster, i3d, tmp_path):
    address, env, tmpdir = cluster
    videos = tmp_path / "videos"
    videos.mkdir()
    for k, (stem, frames) in enumerate(VIDEOS.items()):
        write_video(videos / f"{stem}.mp4", moving_scene(frames, 120, 160, seed=k), 25)
    # Every server of the cluster listens on 127.0.0.1 only.
    listening = _listening(_ours(tmpdir))
    assert listening and all(addr.split(":")[0] in LOOPBACK_HEX for addr in listening), listening

    out = tmp_path / "ray"
    driver = subprocess.Popen([sys.executable, "-m", "aqa_cli", "extract-features", str(videos), "--out", str(out),
                               "--engine", "ray", "--address", address, "--workers", "2", "--threads-per-worker",
                               "1", "--batch-size", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        killed = None
        deadline = time.monotonic() + 150
        while killed is None and driver.poll() is None and time.monotonic() < deadline:
            second = _ours(tmpdir, "AQA_TEST_NODE=second")
            if any(_title(pid) == "ray::ExtractWorker.extract" for pid in second):
                raylets = [pid for pid in second if _title(pid).endswith("/raylet")]
                assert len(raylets) == 1, [_title(pid) for pid in second]
                time.sleep(0.3)  # inside the video
                os.kill(raylets[0], signal.SIGKILL)
                killed = raylets[0]
            time.sleep(0.05)
        assert killed is not None, "the second node's worker was never seen extracting"
        stdout, stderr = driver.communicate(timeout=150)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "died extracting" in " ".join(stderr.split())  # the lost node's video went to the head's worker
    assert f"{len(VIDEOS)} extracted" in " ".join(stdout.split())

    local = tmp_path / "local"
    res = invoke_aqa("extract-features", videos, "--out", local, "--batch-size", "1")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in local.iterdir())  # nothing partial
    for p in local.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_a_driver_without_the_clusters_token_is_told_how_to_join(monkeypatch, tmp_path):
    """Ray's refusal (a ConnectionError caused by an AuthenticationError) becomes one line naming the fix."""
    from ray.exceptions import AuthenticationError

    from aqa_cli.errors import AqaError
    from aqa_cli.extract import ExtractEvents
    from aqa_cli.ray_engine import RayOptions, _RayRun

    calls = []

    def refused(**kwargs):
        calls.append(kwargs)
        try:
            raise AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect.")
        except AuthenticationError as exc:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    run = _RayRun(RayOptions(address="10.0.0.1:6379"), "cpu", settings=None, events=ExtractEvents())
    with pytest.raises(AqaError) as caught:
        run.__enter__()
    text = str(caught.value)
    assert "10.0.0.1:6379" in text and "token authentication" in text and "RAY_AUTH_MODE is not 'token'" in text
    assert "RAY_AUTH_TOKEN" in caught.value.fix and "ray get-auth-token" in caught.value.fix
    assert len(calls) == 1  # no retry: it would be refused the same way

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(AqaError, match=r"no token is set here \(RAY_AUTH_TOKEN\)"):
        _RayRun(RayOptions(address="10.0.0.1:6379"), "cpu", settings=None, events=ExtractEvents()).__enter__()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-clusters")
    with pytest.raises(AqaError, match="this token is not the cluster's"):
        _RayRun(RayOptions(address="10.0.0.1:6379"), "cpu", settings=None, events=ExtractEvents()).__enter__()
