"""The pose backbone: normalisation, clip features and the plausibility gate (no mediapipe needed), the one-line
error without mediapipe, and real BlazePose on a real video, on a video with nobody in it and on the random
texture where BlazePose sees phantoms."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from aqa_cli.backbones.pose import (FEATURE_DIM, L_HIP, L_SHOULDER, MAX_END_ON, MIN_NOSE_M, MIN_TORSO_TO_LIMB,
                                    N_LANDMARKS, NOSE, PER_SEGMENT, R_HIP, R_SHOULDER, SEGMENTS, body_measures,
                                    clip_feature, normalise_landmarks, plausible_body)
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


def _world_body(shoulder_width: float = 0.259, hip_width: float = 0.191) -> np.ndarray:
    """World landmarks [33, 3] in metres of a 1.75 m adult standing, arms down, facing the camera; hips at the
    origin, y down, z away from the camera (BlazePose's axes). Joint heights and widths as fractions of
    stature from standard anthropometric tables (shoulder 0.818, elbow 0.630, wrist 0.485, hip 0.530,
    knee 0.285, ankle 0.039); the nose 1.60 m up and 0.1 m in front. Face, hands and feet stay at the origin:
    the gate does not read them."""
    stature, hip = 1.75, 0.530 * 1.75
    sx, hx = shoulder_width * stature / 2, hip_width * stature / 2
    world = np.zeros((N_LANDMARKS, 3))
    for side, (sh, el, wr, hp, kn, an) in ((1, (11, 13, 15, 23, 25, 27)), (-1, (12, 14, 16, 24, 26, 28))):
        for i, x, height in ((sh, sx, 0.818), (el, sx, 0.630), (wr, sx, 0.485), (hp, hx, 0.530), (kn, hx, 0.285),
                             (an, hx, 0.039)):
            world[i] = (side * x, hip - height * stature, 0.0)
    world[NOSE] = (0.0, hip - 1.60, -0.10)
    return world


def _turned(world: np.ndarray, axis: int, degrees: float) -> np.ndarray:
    """The body rotated about one of the camera's axes (0 = x, 1 = y, 2 = z, the line of sight)."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return world @ rot.T


def test_plausibility_gate_on_hand_made_bodies():
    body = _world_body()
    m = body_measures(body)
    # The anthropometric adult sits where the constants' comments say a person does.
    np.testing.assert_allclose(m["torso_to_limb"], 1.40, atol=0.01)
    np.testing.assert_allclose(m["nose_m"], 0.196, atol=0.002)
    assert m["end_on"] < 0.01
    # Which way up an athlete is does not matter: lying, upside down, side-on, leaning towards the camera.
    for axis, degrees in ((2, 90), (2, 180), (1, 90), (0, 60)):
        assert plausible_body(_turned(body, axis, degrees)), (axis, degrees)

    squashed = body.copy()
    squashed[[L_SHOULDER, R_SHOULDER, 13, 14, 15, 16, NOSE], 1] += 0.22  # upper body slid into the hips
    nose_in_chest = body.copy()
    nose_in_chest[NOSE] = (0.0, -0.45, -0.03)  # 6 cm from the shoulder midpoint
    # What BlazePose reports on random texture: a narrow body pointing straight at the camera.
    end_on = _turned(_world_body(shoulder_width=0.09, hip_width=0.07), 0, 90)

    def failed(world: np.ndarray) -> set[str]:
        m = body_measures(world)
        return ({"torso"} if m["torso_to_limb"] < MIN_TORSO_TO_LIMB else set()) \
            | ({"end_on"} if m["end_on"] > MAX_END_ON else set()) | ({"nose"} if m["nose_m"] < MIN_NOSE_M else set())

    # Each fails one check only, so each check is tested on its own.
    assert failed(body) == set()
    assert failed(squashed) == {"torso"}  # torso 0.28 m against 0.25-0.43 m limb bones
    assert failed(nose_in_chest) == {"nose"}
    assert failed(end_on) == {"end_on"}

    batch = np.stack([body, squashed, nose_in_chest, end_on, np.zeros_like(body)])
    np.testing.assert_array_equal(plausible_body(batch), [True, False, False, False, False])  # a point is no body
    np.testing.assert_array_equal(plausible_body(batch[None]), [[True, False, False, False, False]])


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
    person, lm, rejected = frames["person"], frames["landmarks"], frames["rejected"]
    assert feats.shape == (len(sidecar["clips"]), FEATURE_DIM) and np.isfinite(feats).all()
    assert person.shape == (feats.shape[0], 32) and sidecar["person_frames"] == person.sum(axis=1).tolist()
    found = person.mean()
    seen = lm[person]
    head_above_hips = np.mean(seen[:, NOSE, 1] < seen[:, [L_HIP, R_HIP], 1].mean(axis=1))
    upper = seen[:, [NOSE, L_SHOULDER, R_SHOULDER], :2]
    on_screen = np.mean((upper >= 0) & (upper <= 1))
    print(f"\narm_wrestling: a person in {person.sum()} of {person.size} frames ({rejected.sum()} refused by the "
          f"plausibility gate); head above hips in {head_above_hips:.1%}; nose and shoulders on screen {on_screen:.1%}")
    assert found > 0.75
    assert rejected.mean() < 0.02 and not (rejected & person).any()  # the gate leaves a real person alone
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

    # A red disc crossing a plain grey frame: BlazePose finds nothing at all (the random texture, where it does
    # find phantoms, is the next test).
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
    assert not frames["rejected"].any()
    assert sidecar["person_frames"] == [0, 0]
    assert any("no person in 64 of 64 frames" in w for w in outcome.warnings)
    feats = np.load(tmp_path / "out" / "disc.npy")
    runs = feats[:, : SEGMENTS * PER_SEGMENT].reshape(2, SEGMENTS, PER_SEGMENT)
    assert (runs[..., -1] == 0).all()  # presence 0 in every run


def test_random_texture_phantoms_are_refused(pose_backbone, tmp_path):
    from aqa_cli.extract import extract_to_folder
    from aqa_cli.synthetic import moving_scene, write_video

    # synthetic.moving_scene at its own size: BlazePose alone reports a person in 62 of these 64 frames, bodies
    # folded into the disc or pointing at the camera. The gate must refuse them, frame by frame.
    video = write_video(tmp_path / "texture.mp4", moving_scene(64), 25.0)
    [outcome] = extract_to_folder([video], pose_backbone, tmp_path / "out")
    assert outcome.status == "extracted", outcome.error
    frames = np.load(tmp_path / "out" / "texture.frames.npz")
    person, rejected = frames["person"], frames["rejected"]
    print(f"\nrandom texture: a person in {person.sum()} of {person.size} frames, {rejected.sum()} refused")
    assert person.sum() <= 3  # 1 when measured
    assert rejected.sum() >= 16  # the detector did fire (30 when measured): the gate, not luck, says no person
    assert not (rejected & person).any()
    assert np.isnan(frames["landmarks"][~person]).all() and np.isnan(frames["world"][~person]).all()
