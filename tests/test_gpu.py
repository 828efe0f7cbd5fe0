"""The CUDA path: fused attention and bf16 on the GPU, the automatic batch size, pinned transfers, decode workers.

Tests marked ``gpu`` are skipped where torch sees no CUDA device (conftest.py); ``bench/gpu_check.sh``
runs them on a GPU machine. The last test runs everywhere: the check script's dry run on the CPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from aqa_cli.backbones import Backbone, get_backbone_spec, native_bf16, resolve_precision
from aqa_cli.backbones.i3d import InceptionI3d, fuse_batchnorm
from aqa_cli.backbones.vst import SwinConfig, VideoSwin, build_swin3d, use_fused_attention
from conftest import REPO

SMALL = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=(2, 7, 7))
CUDA = torch.device("cuda")


def small_vst() -> VideoSwin:
    torch.manual_seed(0)
    return VideoSwin(use_fused_attention(build_swin3d(SMALL))).eval().requires_grad_(False)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu())


@pytest.mark.gpu
def test_fused_vst_on_the_gpu_matches_the_cpu_and_bf16_stays_within_the_bound():
    model = small_vst()
    x = torch.randn(2, 3, 8, 112, 112)
    with torch.inference_mode():
        want = model(x).features
        gpu = copy.deepcopy(model).to(CUDA)
        got = gpu(x.to(CUDA)).features
        assert gpu(x.to(CUDA)).features.equal(got)  # the cached masks are reused, not rebuilt differently
        torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-3)  # TF32 may be on: loose
        bf16 = gpu.to(torch.bfloat16)(x.to(CUDA, torch.bfloat16)).features
    assert cosines(bf16, want).min() >= 0.999


@pytest.mark.gpu
def test_i3d_on_the_gpu_matches_the_cpu_in_fp32_and_bf16():
    torch.manual_seed(0)
    model = fuse_batchnorm(InceptionI3d()).eval().requires_grad_(False)
    x = torch.randn(1, 3, 16, 112, 112)
    with torch.inference_mode():
        want = model(x).features
        gpu = copy.deepcopy(model).to(CUDA)
        torch.testing.assert_close(gpu(x.to(CUDA)).features.cpu(), want, atol=1e-3, rtol=1e-3)
        bf16 = gpu.to(torch.bfloat16)(x.to(CUDA, torch.bfloat16)).features
    assert cosines(bf16, want).min() >= 0.999


@pytest.mark.gpu
def test_auto_precision_batch_size_and_pinned_transfers_on_the_gpu():
    spec = get_backbone_spec("vst")
    assert resolve_precision("auto", CUDA, spec) == ("bf16" if spec.bf16_within_bounds and native_bf16(CUDA)
                                                      else "fp32")
    small = spec.recipe.replace(clip_len=8, stride=8, final_size=(112, 112))
    bb = Backbone(spec, small_vst().to(CUDA), weights_sha256="", class_names=None, device=CUDA, precision="fp32")
    bb.recipe = small
    batch = bb.auto_batch_size()
    assert 1 <= batch <= 64 and bb._clip_bytes > 0
    clips = np.random.default_rng(0).integers(0, 256, (3, 8, 112, 112, 3), dtype=np.uint8)
    feats, _ = bb(clips)
    assert bb._pinned is not None and bb._pinned.is_pinned()  # the staging buffer the async copy reads
    cpu = Backbone(spec, small_vst(), weights_sha256="", class_names=None, device=torch.device("cpu"),
                   precision="fp32")
    cpu.recipe = small
    np.testing.assert_allclose(feats, cpu(clips)[0], atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_decode_workers_on_the_gpu_give_the_cpu_features(tmp_path):
    from aqa_cli.extract import extract_to_folder
    from aqa_cli.synthetic import moving_scene, write_video

    spec = get_backbone_spec("vst")
    small = spec.recipe.replace(clip_len=8, stride=8, final_size=(112, 112))
    videos = [write_video(tmp_path / f"v{i}.mp4", moving_scene(24 + 8 * i, 120, 160, seed=i), 25) for i in range(3)]
    outs = {}
    for device, workers in ((CUDA, 3), (torch.device("cpu"), 1)):
        model = small_vst().to(device)
        bb = Backbone(spec, model, weights_sha256="", class_names=None, device=device, precision="fp32")
        bb.recipe = small
        outs[device.type] = extract_to_folder(videos, bb, tmp_path / device.type, batch_size=None,
                                              decode_workers=workers)
    for g, c in zip(outs["cuda"], outs["cpu"]):
        assert g.status == c.status == "extracted"
        np.testing.assert_allclose(np.load(g.features_path), np.load(c.features_path), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_gpu_check_script_parses_and_its_python_runs_on_the_cpu(tmp_path):
    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(script), "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=1600,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
                               "WHEEL_SITE": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "decoders" in (tmp_path / "environment.txt").read_text()  # the preflight ran and said what it found
    table = (tmp_path / "gpu.md").read_text()
    assert "| vst | random | fp32 | 2 |" in table and "| i3d |" in table and "end to end" in table
    if not torch.cuda.is_available():
        # Without CUDA the gpu-marked tests are collected and skipped, with the reason given.
        log = (tmp_path / "gpu_tests.log").read_text()
        assert "4 skipped" in log, log


# ------------------------------------------------------------------ the device image: no PyAV, decord carried, OpenCV


def test_without_pyav_opencv_writes_the_video_and_decord_alone_reads_it(tmp_path, monkeypatch):
    """The GPU image has OpenCV and the carried decord but no PyAV: aqa must still write and read videos there."""
    pytest.importorskip("cv2", reason="OpenCV writes the test video where PyAV is absent")
    from aqa_cli import video
    from aqa_cli.errors import VideoError
    from aqa_cli.synthetic import moving_scene, write_video

    if video._decord is None:
        pytest.skip("decord is not installed")
    frames = list(moving_scene(30, 96, 128, seed=1))
    with_pyav = video.open_video(write_video(tmp_path / "ref.mp4", frames, 25))
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError, as on the image
    assert video.available_decoders()["pyav"] is None
    path = write_video(tmp_path / "cv.mp4", frames, 25)
    with pytest.raises(ValueError, match="need PyAV"):
        write_video(tmp_path / "rot.mp4", frames, 25, rotation=90)
    with video.open_video(path) as reader:
        info = reader.info
        got = np.concatenate([chunk for _, chunk in reader.iter_chunks(range(info.num_frames))])
    assert (info.decoder, info.num_frames, info.fps, info.width, info.height) == ("decord", 30, 25.0, 128, 96)
    assert reader.timestamps[1] == pytest.approx(0.04)
    assert np.abs(got.astype(int) - np.stack(frames).astype(int)).mean() < 8  # lossy MPEG-4, the same scene
    with with_pyav as ref:
        assert ref.info.num_frames == info.num_frames and ref.info.decoder == "decord"
    (tmp_path / "notes.mp4").write_text("not a video\n" * 50)
    with pytest.raises(VideoError, match="notes.mp4: not a readable video"):
        video.open_video(tmp_path / "notes.mp4")
    with pytest.raises(VideoError, match="PyAV is not installed"):
        video.open_video(path, decoder="pyav")


def test_the_rehearsal_and_wheel_scripts_parse_and_the_image_list_holds_what_aqa_needs():
    for script in ("gpu_check.sh", "gpu_wheels.sh", "gpu_rehearsal.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "bench" / script)], capture_output=True).returncode == 0
    image = {line.split("==")[0] for line in (REPO / "bench" / "gpu_image_packages.txt").read_text().splitlines()
             if line and not line.startswith("#")}
    # aqa's dependencies that the device image must have (decord travels as a wheel; av and pytorchvideo are lazy).
    assert {"torch", "torchvision", "numpy", "typer", "rich", "pandas", "pillow", "safetensors", "matplotlib",
            "scipy", "pytest", "opencv-python-headless"} <= image
    assert not {"decord", "av", "pytorchvideo"} & image
