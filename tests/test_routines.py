"""The synthetic routines behind the demo head: deterministic renders, faults exactly where the labels say,
scores that fall with severity, the committed samples, and the shipped demo head finding the fall."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from aqa_cli.dataset import read_labels
from aqa_cli.presets import load_preset

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
DEMO_HEAD = REPO / "weights" / "demo-interp.safetensors"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_routines", SAMPLES / "make_routines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_routines"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


mr = _load_script()


def frames_of(routine) -> np.ndarray:
    return np.stack(list(mr.render(routine)))


def digest(frames: np.ndarray) -> str:
    return hashlib.sha256(frames.tobytes()).hexdigest()


def differing_clips(a: np.ndarray, b: np.ndarray) -> set[int]:
    changed = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))
    return {int(f) // mr.CLIP for f in changed}


def test_a_seed_renders_the_same_frames_every_time():
    a, b = mr.plan_routine(5), mr.plan_routine(5)
    assert a == b
    assert digest(frames_of(a)) == digest(frames_of(b))
    assert digest(frames_of(mr.plan_routine(6))) != digest(frames_of(a))


@pytest.mark.parametrize("kind", mr.FAULT_KINDS)
def test_a_fault_changes_its_own_clip_and_no_other(kind):
    fault = mr.Fault(kind, 2, 0.7)
    faulty = mr.plan_routine(3, n_clips=5, faults=(fault,))
    clean = faulty.without_faults()
    assert clean.elements == faulty.elements
    a, b = frames_of(faulty), frames_of(clean)
    assert a.shape == (5 * mr.CLIP, mr.SIZE, mr.SIZE, 3)
    assert differing_clips(a, b) == {2}
    first, last = fault.frames
    # Most of the clip changes, not a frame or two: the fault is an event I3D can see.
    changed = (a[first:last + 1] != b[first:last + 1]).reshape(mr.CLIP, -1).any(axis=1)
    assert changed.sum() >= 24, f"{kind}: only {changed.sum()} frames changed"


def test_drawn_faults_sit_where_the_labels_say():
    checked = 0
    for seed in range(40, 80):
        routine = mr.plan_routine(seed)
        if len(routine.faults) < 2:
            continue
        label = routine.label(f"r{seed}")
        clips = {f["clip"] for f in label["faults"]}
        for f in label["faults"]:
            assert (f["frame_start"], f["frame_end"]) == (32 * f["clip"], 32 * f["clip"] + 31)
        assert differing_clips(frames_of(routine), frames_of(routine.without_faults())) == clips
        checked += 1
        if checked == 2:
            break
    assert checked == 2


def test_scores_drop_with_each_faults_severity():
    clean = mr.plan_routine(9, n_clips=6, faults=())
    for kind in mr.FAULT_KINDS:
        scores = [mr.plan_routine(9, n_clips=6, faults=(mr.Fault(kind, 1, s),)).score for s in (0.3, 0.6, 1.0)]
        assert clean.score > scores[0] > scores[1] > scores[2], kind
        # Same seed, same noise: the drop is exactly the deduction × severity.
        assert clean.score - scores[2] == pytest.approx(mr.DEDUCTIONS[kind], abs=2e-3)
    two = mr.plan_routine(9, n_clips=6, faults=(mr.Fault("fall", 1, 1.0), mr.Fault("stop", 4, 1.0)))
    assert two.score == pytest.approx(clean.score - 5.0, abs=2e-3)
    assert 0.0 <= two.score <= 10.0


def test_the_figure_stays_inside_the_i3d_centre_crop():
    lo, hi = mr.CROP
    for seed, faults in [(21, (mr.Fault("fall", 0, 1.0), mr.Fault("underrot", 2, 1.0))),
                         (22, (mr.Fault("wobble", 1, 1.0), mr.Fault("fall", 3, 1.0))), (23, None)]:
        routine = mr.plan_routine(seed, n_clips=4, faults=faults)
        bg = mr.background(routine.look)
        moved = (frames_of(routine) != bg[None]).any(axis=(0, 3))  # pixels the figure or its shadow ever touched
        ys, xs = np.nonzero(moved)
        assert ys.min() >= lo and xs.min() >= lo and ys.max() < hi and xs.max() < hi, seed


def test_bad_faults_are_refused():
    with pytest.raises(ValueError, match="distinct clips"):
        mr.plan_routine(1, n_clips=5, faults=(mr.Fault("fall", 1, 0.5), mr.Fault("stop", 1, 0.5)))
    with pytest.raises(ValueError, match="distinct clips"):
        mr.plan_routine(1, n_clips=5, faults=(mr.Fault("fall", 5, 0.5),))
    with pytest.raises(ValueError, match="kind must be"):
        mr.plan_routine(1, n_clips=5, faults=(mr.Fault("slip", 1, 0.5),))


def test_label_files_are_what_aqa_train_reads(tmp_path):
    routines = [mr.plan_routine(s) for s in (100, 101, 102)]
    mr.write_labels([r.label(f"routine_{r.seed}") for r in routines], tmp_path, "labels")
    labels = read_labels(tmp_path / "labels.csv")
    assert labels.ids == ["routine_100", "routine_101", "routine_102"]
    assert list(labels.target(labels.column("score"))) == pytest.approx([r.score for r in routines])
    detail = json.loads((tmp_path / "labels.json").read_text())
    assert [len(v["faults"]) for v in detail["videos"]] == [len(r.faults) for r in routines]


def test_committed_samples_come_from_the_script():
    """The samples' labels are the script's, and each video decodes to the script's frames (up to H.264)."""
    from aqa_cli.video import open_video

    recorded = json.loads((SAMPLES / "routines.json").read_text())
    routines = mr.sample_routines()
    assert [v["id"] for v in recorded["videos"]] == list(routines)
    for entry in recorded["videos"]:
        routine = routines[entry["id"]]
        assert entry == routine.label(entry["id"])
        with open_video(SAMPLES / f"{entry['id']}.mp4") as reader:
            assert reader.info.num_frames == routine.n_frames and reader.info.fps == pytest.approx(25.0)
            decoded = np.concatenate([c for _, c in reader.iter_chunks(range(reader.info.num_frames))])
        error = np.abs(decoded.astype(np.int16) - frames_of(routine).astype(np.int16)).mean()
        assert error < 4.0, f"{entry['id']}: mean error {error:.1f} grey levels against a fresh render"
    fall = routines["routine_fall"]
    assert [(f.kind, f.clip) for f in fall.faults] == [("fall", 3)] and fall.n_clips == 7
    assert sum(p.stat().st_size for p in SAMPLES.glob("routine_*.mp4")) < 2_000_000


def test_demo_preset_is_labelled_and_localises():
    preset = load_preset("demo")
    assert preset.backbone == "i3d" and preset.feature_dim == 1024 and preset.train_clips == 0
    assert (preset.score_min, preset.score_max) == (0.0, 10.0)
    assert "not a sports judge" in preset.description
    assert preset.model_settings("interp")["local_window"] == 0


def test_shipped_demo_head_is_small_and_says_what_it_is():
    from aqa_cli.heads.checkpoint import load_head

    assert DEMO_HEAD.stat().st_size < 5e6
    loaded = load_head(DEMO_HEAD)
    meta = loaded.metadata
    assert loaded.head == "interp" and meta["preset"] == "demo" and meta["target"] == "score"
    assert "not a sports judge" in meta["description"]
    assert loaded.contract["backbone"] == "i3d" and loaded.config["local_window"] == 0


@pytest.mark.slow
def test_demo_head_puts_the_lowest_clip_score_on_the_fall(i3d):
    """Golden: the committed fall sample, through real I3D and the shipped head, gives its lowest clip score
    (and the video a lower score than the clean sample) at the fall's clip."""
    import torch

    from aqa_cli.extract import video_features
    from aqa_cli.heads.checkpoint import load_head

    head = load_head(DEMO_HEAD)
    outs = {}
    for name in ("routine_fall", "routine_clean"):
        feats = torch.from_numpy(video_features(SAMPLES / f"{name}.mp4", i3d).features)
        with torch.no_grad():
            outs[name] = head.model(feats[None], torch.ones(1, len(feats), dtype=torch.bool))
    fall = outs["routine_fall"]
    assert fall.clip_scores.shape == (1, 7)
    assert int(fall.clip_scores[0].argmin()) == 3, fall.clip_scores
    assert float(fall.score) < float(outs["routine_clean"].score) - 1.0
