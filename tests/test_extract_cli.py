"""`aqa extract-features` as a user runs it: outputs, bad files, failures, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from aqa_cli.fileio import TMP_MARK
from aqa_cli.synthetic import index_frames, moving_scene, write_video
from conftest import REPO, invoke_aqa

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _weights(i3d):
    """Make sure the real weights are cached before any subprocess needs them."""


def assert_no_partial_files(folder):
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(TMP_MARK)]
    assert leftovers == []


def test_help_lists_every_command():
    res = invoke_aqa("--help")
    assert res.returncode == 0
    for command in ("info", "score", "extract-features", "weights"):
        assert command in res.stdout


def test_info_reports_versions_devices_decoders_and_weights():
    res = invoke_aqa("info")
    assert res.returncode == 0, res.stderr
    for word in ("torch", "devices", "decoder decord", "decoder pyav", "weights i3d-kinetics400", "cached"):
        assert word in res.stdout


def test_sidecar_records_the_recipe_source_and_clips(tmp_path):
    video = write_video(tmp_path / "v30.mp4", index_frames(90), 30)
    res = invoke_aqa("extract-features", video, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    feats = np.load(tmp_path / "out" / "v30.npy")
    side = json.loads((tmp_path / "out" / "v30.json").read_text())
    assert feats.shape == (2, 1024) and feats.dtype == np.float32
    assert side["shape"] == [2, 1024]
    assert side["backbone"]["name"] == "i3d" and len(side["backbone"]["weights_sha256"]) == 64
    assert side["recipe"] == {"name": "i3d-deepmind", "fps": 25.0, "clip_len": 32, "stride": 32, "leftover": "trim",
                              "resize_short": 256, "crop": [224, 224], "final_size": None, "mean": [0.5] * 3,
                              "std": [0.5] * 3, "interpolation": "bilinear", "antialias": True}
    assert side["source"]["fps"] == 30 and side["source"]["num_frames"] == 90
    assert side["timeline"]["resampled"] and side["timeline"]["timeline_frames"] == 75
    assert [(c["frame_start"], c["frame_end"]) for c in side["clips"]] == [(5, 37), (37, 69)]
    assert side["clips"][1]["start_s"] == pytest.approx(37 / 25)
    assert side["aqa_version"]


def test_bad_inputs_fail_one_by_one_and_the_batch_goes_on(tmp_path, shared):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "good.mp4", index_frames(40), 25)
    write_video(videos / "ten.mp4", index_frames(10), 25)
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.mp4").write_text("this is not a video\n" * 50)
    arm = (shared / "videos" / "arm_wrestling.mp4").read_bytes()
    (videos / "cut.mp4").write_bytes(arm[: len(arm) // 2])
    pancake = (shared / "videos" / "flipping_a_pancake.mkv").read_bytes()
    (videos / "cut_stream.mkv").write_bytes(pancake[: len(pancake) // 2])
    (videos / "readme.txt").write_text("ignored: not a video extension")
    out = tmp_path / "out"

    res = invoke_aqa("extract-features", videos, "--out", out)
    assert res.returncode == 1
    text = res.stdout + res.stderr
    assert "Traceback" not in text
    assert "empty.mp4: the file is empty (0 bytes)" in text
    assert "notes.mp4: not a readable video" in text
    assert "cut.mp4: not a readable video" in text
    assert "3 extracted, 0 skipped (already complete), 3 failed" in " ".join(res.stdout.split())
    # The short video is padded with a warning; a streamable file cut in half keeps what is readable, and warns.
    assert "ten.mp4: only 10 frames" in " ".join(text.split())
    side = json.loads((out / "cut_stream.json").read_text())
    assert "looks truncated" in side["source"]["warnings"][0]
    assert side["shape"][0] == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("good", "ten", "cut_stream") for ext in ("npy", "json"))
    assert np.load(out / "ten.npy").shape == (1, 1024)
    assert json.loads((out / "ten.json").read_text())["clips"][0]["padded"] == 22
    assert_no_partial_files(out)

    # A second run skips what is complete and leaves it byte for byte as it was.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = invoke_aqa("extract-features", videos, "--out", out)
    assert res.returncode == 1
    assert "0 extracted, 3 skipped (already complete), 3 failed" in " ".join(res.stdout.split())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_outputs_of_another_backbone_or_recipe_are_not_overwritten(tmp_path):
    video = write_video(tmp_path / "a.mp4", index_frames(40), 25)
    out = tmp_path / "out"
    assert invoke_aqa("extract-features", video, "--out", out).returncode == 0
    res = invoke_aqa("extract-features", video, "--out", out, "--clip-len", "16")
    assert res.returncode == 1
    text = " ".join(res.stderr.split())  # the console wraps long lines
    assert "was made by another backbone, weights, precision or recipe" in text and "--overwrite" in text
    res = invoke_aqa("extract-features", video, "--out", out, "--clip-len", "16", "--overwrite")
    assert res.returncode == 0
    assert json.loads((out / "a.json").read_text())["shape"] == [2, 1024]


def test_no_videos_and_missing_weights_give_one_line_errors(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    res = invoke_aqa("extract-features", tmp_path / "empty_dir", "--out", tmp_path / "out")
    assert res.returncode == 2 and "no videos found" in res.stderr and "Traceback" not in res.stderr
    video = write_video(tmp_path / "a.mp4", index_frames(40), 25)
    res = invoke_aqa("extract-features", video, "--out", tmp_path / "out",
                     env={"AQA_HOME": str(tmp_path / "home"), "AQA_OFFLINE": "1"})
    assert res.returncode == 2
    assert "aqa weights fetch i3d-kinetics400" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_damaged_cached_weights_are_refused(tmp_path):
    import shutil

    from aqa_cli.weights import weights_dir

    home = tmp_path / "home"
    shutil.copytree(weights_dir(), home / "weights")
    target = home / "weights" / "i3d-kinetics400.safetensors"
    data = bytearray(target.read_bytes())
    data[-100] ^= 0xFF
    target.write_bytes(bytes(data))
    video = write_video(tmp_path / "a.mp4", index_frames(40), 25)
    res = invoke_aqa("extract-features", video, "--out", tmp_path / "out", env={"AQA_HOME": str(home)})
    assert res.returncode == 2
    assert "cached weights are damaged" in res.stderr and "aqa weights fetch i3d-kinetics400 --force" in res.stderr
    res = invoke_aqa("weights", "verify", env={"AQA_HOME": str(home)})
    assert res.returncode == 1 and "DAMAGED" in res.stdout


def test_killed_run_resumes_to_identical_outputs(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    # 1, 3 and 1 clips: the kill lands inside v1's three (a second after v0 is written), and v2 is left undone.
    for k, frames in enumerate((32, 96, 32)):
        write_video(videos / f"v{k}.mp4", moving_scene(frames, 240, 320, seed=k), 25)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "aqa_cli", "extract-features", str(videos), "--out", str(out), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "v0.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the second video
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "v0.json").exists() and not (out / "v2.json").exists()
    first = (out / "v0.npy").stat().st_mtime_ns

    res = invoke_aqa("extract-features", videos, "--out", out, "--batch-size", "1")
    assert res.returncode == 0, res.stderr
    assert "1 skipped" in " ".join(res.stdout.split())
    assert (out / "v0.npy").stat().st_mtime_ns == first
    assert_no_partial_files(out)

    clean = tmp_path / "clean"
    assert invoke_aqa("extract-features", videos, "--out", clean, "--batch-size", "1").returncode == 0
    for k in range(3):
        assert np.array_equal(np.load(out / f"v{k}.npy"), np.load(clean / f"v{k}.npy"))
        assert (out / f"v{k}.json").read_text() == (clean / f"v{k}.json").read_text()
