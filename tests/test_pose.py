"""The pose backbone: normalisation and clip features (no mediapipe needed), the one-line error without
mediapipe, and real BlazePose on a real video and on a video with nobody in it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from aqa_cli.backbones.pose import (FEATURE_DIM, L_HIP, L_SHOULDER, N_LANDMARKS, NOSE, PER_SEGMENT, R_HIP,
                                    R_SHOULDER, SEGMENTS, clip_feature, normalise_landmarks)
from aqa_cli.errors import AqaError


def _skeleton(n: int, width: int = 200, height: int = 100) -> np.ndarray:
    """Image landmarks [n, 33, 4] of an upright figure: hips at (100, 60) px, shoulders 20 px above."""
    lm = np.zeros((n, N_LANDMARKS, 4), np.float32)
    lm[..., 0], lm[..., 1], lm[..., 3] = 100 / width, 60 / height, 0.9
    lm[:, [L_HIP, R_HIP], 0] = np.array([95, 105]) / width
    lm[:, [L_SHOULDER, R_SHOULDER], 0] = np.array([92, 108]) / width
    lm[:, [L_SHOULDER, R_SHOULDER], 1] = 40 / height
    lm[:, NOSE, 1] = 30 / height
    return lm


def test_normalisation_centres_on_hips_and_scales_by_torso():
    lm = _skeleton(3)
    lm[1, :, 0] += 0.25  # the whole figure moved 50 px right: the normalised pose must not change
    norm, hip, torso = normalise_landmarks(lm, 200, 100)
    np.testing.assert_allclose(torso, 20.0, atol=1e-4)
    np.testing.assert_allclose(norm[:, [L_HIP, R_HIP]].mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(norm[0], norm[1], atol=1e-6)
    np.testing.assert_allclose(norm[0, NOSE, 1], -1.5, atol=1e-6)  # 30 px above the hips = 1.5 torsos, y down
    np.testing.assert_allclose(hip[1] - hip[0], [50.0, 0.0], atol=1e-4)


def test_clip_feature_ignores_frames_without_a_person():
    lm = _skeleton(32)
    lm[:, :, 0] += np.linspace(0, 0.31, 32)[:, None]  # walking right, 2 px per frame
    person = np.ones(32, bool)
    person[8:16] = False  # the second run of 8 frames: nobody
    lm[~person] = np.nan
    norm, hip, torso = normalise_landmarks(lm, 200, 100)
    f = clip_feature(norm, lm[..., 3], hip, torso, person, fps=25.0)
    assert f.shape == (FEATURE_DIM,) and np.isfinite(f).all()
    runs = f[: SEGMENTS * PER_SEGMENT].reshape(SEGMENTS, PER_SEGMENT)
    presence, hip_vx = runs[:, -1], runs[:, -3]
    np.testing.assert_allclose(presence, [1, 0, 1, 1])  # the empty run is marked, not a pose at the origin
    np.testing.assert_allclose(hip_vx[[0, 2, 3]], 2.0 * 25 / 20, rtol=1e-4)  # torso lengths per second
    assert hip_vx[1] == 0
    np.testing.assert_allclose(runs[0, :3 * N_LANDMARKS], norm[0].ravel(), atol=1e-5)
    np.testing.assert_allclose(f[-N_LANDMARKS:], 0.9, atol=1e-6)


def test_without_mediapipe_the_error_names_the_install(monkeypatch):
    from aqa_cli.backbones import create_backbone

    monkeypatch.setitem(sys.modules, "mediapipe.python.solutions", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "mediapipe.python.solutions.pose", None)
    with pytest.raises(AqaError) as err:
        create_backbone("pose", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "mediapipe==0.10.14" in msg and "pip install" in msg


@pytest.fixture(scope="module")
def pose_backbone():
    try:
        from mediapipe.python.solutions import pose  # noqa: F401
    except ImportError:
        pytest.skip("mediapipe is not installed (the lean install in the README: pip install --no-deps mediapipe==0.10.14 ...)")
    from aqa_cli.backbones import create_backbone

    return create_backbone("pose", device="cpu")


@pytest.fixture(scope="module")
def arm_wrestling(shared, pose_backbone, tmp_path_factory):
    video = shared / "videos" / "arm_wrestling.mp4"
    if not video.is_file():
        pytest.skip(f"{video} is absent")
    from aqa_cli.extract import extract_to_folder

    out = tmp_path_factory.mktemp("pose-real")
    [outcome] = extract_to_folder([video], pose_backbone, out)
    assert outcome.status == "extracted", outcome.error
    return out, outcome


def test_real_pose_on_arm_wrestling(arm_wrestling):
    out, outcome = arm_wrestling
    sidecar = json.loads((out / "arm_wrestling.json").read_text())
    feats = np.load(out / "arm_wrestling.npy")
    frames = np.load(out / sidecar["frames_file"])
    person, lm = frames["person"], frames["landmarks"]
    assert feats.shape == (len(sidecar["clips"]), FEATURE_DIM) and np.isfinite(feats).all()
    assert person.shape == (feats.shape[0], 32) and sidecar["person_frames"] == person.sum(axis=1).tolist()
    found = person.mean()
    seen = lm[person]
    head_above_hips = np.mean(seen[:, NOSE, 1] < seen[:, [L_HIP, R_HIP], 1].mean(axis=1))
    upper = seen[:, [NOSE, L_SHOULDER, R_SHOULDER], :2]
    on_screen = np.mean((upper >= 0) & (upper <= 1))
    print(f"\narm_wrestling: a person in {person.sum()} of {person.size} frames; head above hips in "
          f"{head_above_hips:.1%}; nose and shoulders on screen {on_screen:.1%}")
    assert found > 0.75
    assert head_above_hips > 0.9
    assert on_screen > 0.8
    assert np.isnan(lm[~person]).all() and not np.isnan(seen).any()  # no-person frames are marked, not zeros


def test_real_pose_is_deterministic(arm_wrestling, pose_backbone, shared):
    from aqa_cli.extract import video_features

    out, _ = arm_wrestling
    again = video_features(shared / "videos" / "arm_wrestling.mp4", pose_backbone)
    np.testing.assert_array_equal(again.features, np.load(out / "arm_wrestling.npy"))


def test_video_with_nobody_reports_no_person(pose_backbone, tmp_path):
    from aqa_cli.extract import extract_to_folder
    from aqa_cli.synthetic import write_video

    # A red disc crossing a plain grey frame. (Not synthetic.moving_scene: on its random block texture
    # BlazePose reports a phantom person in 63 of 64 frames, a property of the detector worth knowing.)
    yy, xx = np.mgrid[0:176, 0:320]
    frames = []
    for i in range(64):
        frame = np.full((176, 320, 3), 90, np.uint8)
        frame[(xx - 160 - 100 * np.sin(i / 10)) ** 2 + (yy - 88) ** 2 < 30 ** 2] = (240, 40, 40)
        frames.append(frame)
    video = write_video(tmp_path / "disc.mp4", frames, 25.0)
    [outcome] = extract_to_folder([video], pose_backbone, tmp_path / "out")
    assert outcome.status == "extracted", outcome.error
    sidecar = json.loads((tmp_path / "out" / "disc.json").read_text())
    frames = np.load(tmp_path / "out" / "disc.frames.npz")
    assert not frames["person"].any() and np.isnan(frames["landmarks"]).all()
    assert sidecar["person_frames"] == [0, 0]
    assert any("no person in 64 of 64 frames" in w for w in outcome.warnings)
    feats = np.load(tmp_path / "out" / "disc.npy")
    runs = feats[:, : SEGMENTS * PER_SEGMENT].reshape(2, SEGMENTS, PER_SEGMENT)
    assert (runs[..., -1] == 0).all()  # presence 0 in every run
