"""The pose-guided exemplar head: planted structure it must learn (a score carried by some frames, per-frame steps,
execution × difficulty), the exact decomposition, the exemplar bank in the checkpoint, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aqa_cli.dataset import load_feature_set
from aqa_cli.errors import AqaError, WeightsError
from aqa_cli.heads import create_head
from aqa_cli.heads.checkpoint import load_head, save_head
from aqa_cli.metrics import spearman
from aqa_cli.synthetic import DIVE_RUN_DIM, DIVE_RUNS, DIVE_STEPS, planted_dives, planted_step_figures
from aqa_cli.training import TrainSettings, fit, predict, predict_set

STEPS = DIVE_STEPS
DIM = 40
RUNS, RUN_DIM, FRAMES = DIVE_RUNS, DIVE_RUN_DIM, 32  # the planted clip feature's layout (aqa_cli.synthetic)
SMALL = {"in_dim": DIM, "hidden_dim": 64, "n_head": 4, "n_layers": 2, "dropout": 0.0, "k_exemplars": 8,
         "bank_size": 64, "step_classes": STEPS, "difficulty_column": "difficulty", "execution_min": 0.0,
         "execution_max": 30.0, "score_min": 0.0, "score_max": 120.0, "frame_runs": RUNS, "run_dim": RUN_DIM}
SETTINGS = TrainSettings(epochs=40, batch_size=16, optimizer="adamw", lr=1e-3, weight_decay=1e-2, crop=0,
                         eval_every=0)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose-planted")
    planted_dives(root / "train", 160, seed=1)
    test_rows = planted_dives(root / "test", 80, seed=2)
    train = load_feature_set(root / "train", root / "train" / "labels.csv", "dive_score")
    test = load_feature_set(root / "test", root / "test" / "labels.csv", "dive_score")
    res = fit("pose", SMALL, train, SETTINGS, seed=0)
    return res.head, train, test, test_rows, res


def test_planted_score_steps_and_difficulty(planted):
    head, train, test, rows, res = planted
    assert head.config.difficulty_active and head.config.score_max == 30.0  # it learnt the execution scale
    execution = np.array([float(r["execution"]) for r in rows])
    raw = predict(head, test.features)  # no labels: execution scores
    rho_exec = spearman(raw, execution)
    final = predict_set(head, test)  # × difficulty from the labels
    rho_final = spearman(final, test.targets)
    print(f"\nplanted (held out, 80 dives): execution ρ {rho_exec:.3f}, dive score ρ {rho_final:.3f}, "
          f"MAE {np.abs(final - test.targets).mean():.2f} points, {res.seconds:.1f} s training")
    assert rho_exec > 0.9
    assert rho_final > 0.9
    np.testing.assert_allclose(final, raw * np.array([float(r["difficulty"]) for r in rows]), rtol=1e-6)

    # Step labels, per frame, on held-out dives: accuracy (chance 0.25) and where the boundaries fall.
    steps = planted_step_figures(head, test)
    acc, err, run_err = steps["accuracy"], steps["boundary_error"], steps["run_boundary_error"]
    print(f"step accuracy per frame {acc:.3f} (chance 0.25); boundary error {err:.2f} frames (a perfect "
          f"8-frame-run classifier: {run_err:.2f}; per clip: more)")
    assert acc > 0.95
    assert err < run_err  # finer than the runs its evidence comes in
def test_decomposition_is_exact_and_exemplars_fixed(planted):
    head, _, test, _, _ = planted
    x = torch.zeros(2, 9, DIM)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    for i, f in enumerate(test.features[:2]):
        x[i, : len(f)] = torch.tensor(f)
        mask[i, : len(f)] = True
    with torch.inference_mode():
        out = head(x, mask)
        again = head(x, mask)
    torch.testing.assert_close((out.weights * out.clip_scores).sum(1), out.score, rtol=0, atol=1e-4)
    assert not out.additive
    torch.testing.assert_close(out.weights.sum(1), torch.ones(2))
    assert bool((out.weights[~mask] == 0).all()) and bool((out.weights >= 0).all())
    torch.testing.assert_close(out.score, again.score, rtol=0, atol=0)  # deterministic exemplars
    rows = out.extras["exemplar_rows"]
    assert rows.shape == (2, 8) and bool((rows[0] == rows[1]).all())  # the same K exemplars for every query
    # score = mean_k (exemplar_k + difference_k), on the head's (execution) scale
    torch.testing.assert_close(out.score, (out.extras["exemplar_scores"] + out.extras["difference"]).mean(1),
                               rtol=0, atol=1e-4)
    info = head.describe(out, 0)
    assert len(info["exemplars"]) == 8
    runs = info["steps"]  # runs of one step over the real frames, in order, without gaps
    assert runs[0]["frame_start"] == 0 and runs[-1]["frame_end"] == int(mask[0].sum()) * FRAMES
    assert all(r["frame_end"] == n["frame_start"] and r["step"] != n["step"] for r, n in zip(runs, runs[1:]))


def test_checkpoint_carries_the_bank(planted, tmp_path):
    head, train, test, _, _ = planted
    path = save_head(tmp_path / "pose.safetensors", [head], {"target": "dive_score"})
    loaded = load_head(path)
    ids = loaded.model.exemplar_ids()
    assert len(ids) == 64 and set(ids) <= set(train.ids)  # 64 of the 160 training dives, spread over the scores
    np.testing.assert_allclose(predict(loaded.model, test.features), predict(head, test.features), atol=1e-4)
    np.testing.assert_allclose(predict_set(loaded.model, test), predict_set(head, test), atol=1e-3)


def test_bank_of_wrong_dimension_is_refused(planted, tmp_path):
    head, train, _, _, _ = planted
    with pytest.raises(AqaError) as err:
        head.set_bank([np.zeros((3, DIM + 1), np.float32)], np.array([10.0]), ["bad"], source="bank.csv")
    msg = str(err.value)
    assert "\n" not in msg and "bank.csv" in msg and f"expects [clips, {DIM}]" in msg and "--backbone pose" in msg
    # A checkpoint whose bank was stored with another feature size.
    path = save_head(tmp_path / "pose.safetensors", [head], {"target": "dive_score"})
    from aqa_cli.weights import read_safetensors, save_safetensors

    tensors, meta = read_safetensors(path)
    tensors["members.0.bank_features"] = torch.zeros(64, tensors["members.0.bank_features"].shape[1], DIM + 3)
    save_safetensors(tensors, tmp_path / "bad.safetensors", meta)
    with pytest.raises(WeightsError) as err:
        load_head(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "\n" not in msg and "bad.safetensors" in msg and f"{DIM + 3}-d but the pose head expects {DIM}-d" in msg


def test_direct_baseline_and_label_errors(planted, tmp_path):
    _, train, _, _, _ = planted
    settings = TrainSettings(epochs=2, batch_size=16, optimizer="adamw", lr=1e-3, crop=0, eval_every=0)
    base = fit("pose", {**SMALL, "exemplars": False}, train, settings, seed=0).head
    assert "bank_features" not in base.state_dict()
    with torch.inference_mode():
        out = base(torch.tensor(train.features[0])[None])
    torch.testing.assert_close((out.weights * out.clip_scores).sum(1), out.score, rtol=0, atol=1e-4)

    # Step labels that do not name one class per clip, and an unknown class, are refused naming the file.
    bad = train.subset(range(4))
    bad.aux = {**bad.aux, "steps": ["flight"] + bad.aux["steps"][1:]}
    with pytest.raises(AqaError, match=r"labels\.csv: id 'd000' has 1 step label\(s\) for \d+ clips"):
        fit("pose", SMALL, bad, settings)
    bad.aux = {**bad.aux, "steps": [" ".join(["swim"] * len(bad.features[0]))] + bad.aux["steps"][1:]}
    with pytest.raises(AqaError, match="unknown step 'swim'"):
        fit("pose", SMALL, bad, settings)
    # A crop shorter than the dives cannot line up with per-clip labels.
    with pytest.raises(AqaError, match="crop=0"):
        fit("pose", SMALL, train.subset(range(8)), TrainSettings(epochs=1, batch_size=8, crop=3, eval_every=0))
    # Evaluation without the difficulty column cannot turn execution into dive scores.
    head = create_head("pose", {**SMALL, "bank_clips": 9, "bank_id_len": 4, "difficulty_active": True})
    nodd = train.subset(range(4))
    nodd.aux = {k: v for k, v in nodd.aux.items() if k != "difficulty"}
    with pytest.raises(AqaError, match="needs the difficulty column"):
        head.apply_labels(np.ones(4), nodd)


def test_step_labels_per_frame_per_clip_and_over_the_timeline(tmp_path):
    """The forms a steps cell may take, and how each lines up with a 2-clip video's 64 frames."""
    from aqa_cli.dataset import FeatureSet
    from aqa_cli.heads.pose import PoseConfig, _encode_steps

    config = PoseConfig(in_dim=DIM, step_classes=STEPS, frame_runs=RUNS, run_dim=RUN_DIM)
    cells = {
        "frames": "approach:20 takeoff:10 flight:30 entry:4",  # 64 = 2 clips × 32
        "clips": "takeoff | flight",  # one per clip
        "timeline": "approach:23 takeoff:10 flight:30 entry:7",  # 70 frames: the recipe trims 3 + 3
        "padded": "approach:20 takeoff:10 flight:20",  # 50 frames: the last clip padded, 14 frames unlabelled
        "empty": "",
    }
    data = FeatureSet(ids=list(cells), features=[np.zeros((2, DIM), np.float32)] * len(cells),
                      targets=np.zeros(len(cells)), feature_dir=tmp_path, labels_path=tmp_path / "labels.csv",
                      target_name="dive_score", aux={"steps": list(cells.values())})
    out, clips = _encode_steps(config, data)
    assert out.shape == (5, 64) and clips.tolist() == [2, 2, 2, 2, 0]
    np.testing.assert_array_equal(out[0], np.repeat([0, 1, 2, 3], [20, 10, 30, 4]))
    np.testing.assert_array_equal(out[1], np.repeat([1, 2], 32))
    np.testing.assert_array_equal(out[2], np.repeat([0, 1, 2, 3], [20, 10, 30, 4]))
    np.testing.assert_array_equal(out[3], np.repeat([0, 1, 2, -1], [20, 10, 20, 14]))
    assert bool((out[4] == -1).all())

    for cell, match in [("flight:0", "NAME:FRAMES"), ("flight:x", "NAME:FRAMES"), ("flight:96", "96 step label"),
                        ("approach:10", "10 step label")]:
        data.aux = {"steps": [cell] + list(cells.values())[1:]}
        with pytest.raises(AqaError, match=match) as err:
            _encode_steps(config, data)
        assert "\n" not in str(err.value) and "labels.csv" in str(err.value)


def test_step_runs_get_their_times():
    from aqa_cli.heads.pose import step_runs
    from aqa_cli.scoring import ClipScore, _time_step_runs

    runs = step_runs(torch.tensor(np.repeat([0, 1, 2, 3], [20, 10, 30, 4])), STEPS)
    assert [(r["step"], r["frame_start"], r["frame_end"]) for r in runs] == [
        ("approach", 0, 20), ("takeoff", 20, 30), ("flight", 30, 60), ("entry", 60, 64)]
    # Two 32-frame clips at 25 fps, the first starting 0.12 s into the video (the trimmed head).
    clips = [ClipScore(0, 0.12, 1.40, 0.5, 1.0), ClipScore(1, 1.40, 2.68, 0.5, 1.0)]
    _time_step_runs(runs, clips, 32)
    assert [(r["start_s"], r["end_s"]) for r in runs] == [(0.12, 0.92), (0.92, 1.32), (1.32, 2.52), (2.52, 2.68)]


def test_train_and_score_from_the_command_line(tmp_path):
    """`aqa train --head pose --preset finediving` learns from the steps and difficulty columns; `aqa score`
    says the score is an execution score, names the exemplars and prints the steps with their times."""
    from conftest import invoke_aqa

    planted_dives(tmp_path / "f", 24, seed=5, dim=837)
    ckpt = tmp_path / "pose.safetensors"
    res = invoke_aqa("train", "--features", tmp_path / "f", "--labels", tmp_path / "f" / "labels.csv",
                     "--target", "dive_score", "--head", "pose", "--preset", "finediving", "--epochs", "3",
                     "--set", f"frame_runs={RUNS}", "--set", f"run_dim={RUN_DIM}", "--set", "hidden_dim=32",
                     "--set", "k_exemplars=4", "--out", ckpt, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "steps" in json.loads(ckpt.with_suffix(".log.json").read_text())["history"][-1]
    res = invoke_aqa("score", tmp_path / "f" / "d000.npy", "--weights", ckpt, "--backbone", "pose", "--no-cache",
                     "--json", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    runs, clips = result["extras"]["steps"], result["clips"]
    assert runs[0]["frame_start"] == 0 and runs[-1]["frame_end"] == 32 * len(clips)
    assert runs[0]["start_s"] == pytest.approx(clips[0]["start_s"]) and runs[-1]["end_s"] == pytest.approx(clips[-1]["end_s"])
    assert len(result["extras"]["exemplars"]) == 4
    res = invoke_aqa("score", tmp_path / "f" / "d000.npy", "--weights", ckpt, "--backbone", "pose", "--no-cache",
                     env={"OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    text = " ".join(res.stdout.split())
    assert "scale: execution score (target ÷ difficulty)" in text and "exemplars (4, score + difference)" in text
    assert f"steps: {runs[0]['step']} {runs[0]['start_s']:.2f}–{runs[0]['end_s']:.2f} s" in text


def test_exemplars_of_the_same_dive_type(planted, tmp_path):
    """With group_column, training pairs a dive with another of its own type (never itself), labelled inference
    takes all K exemplars from the dive's type, and an unknown type (or aqa score, with no labels) falls back
    to the fixed K of the whole bank."""
    _, train, test, _, _ = planted

    def typed(data):
        out = data.subset(range(len(data)))
        out.aux = {**out.aux, "dive_type": [f"t{i % 3}" if i % 10 else "" for i in range(len(out))]}
        return out

    tr, te = typed(train), typed(test)
    settings = TrainSettings(epochs=3, batch_size=16, optimizer="adamw", lr=1e-3, crop=0, eval_every=0)
    head = fit("pose", {**SMALL, "group_column": "dive_type"}, tr, settings, seed=0).head
    assert head.config.groups == ["t0", "t1", "t2"]
    stored = head.bank_groups[head.bank_valid]
    counts = torch.bincount(stored + 1, minlength=4).tolist()  # untyped, t0, t1, t2
    assert sum(counts) == 64 and all(c >= 1 for c in counts) and abs(counts[1] - counts[2]) <= 2

    x = torch.zeros(4, 9, DIM)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for i, f in enumerate(tr.features[:4]):
        x[i, : len(f)] = torch.tensor(f)
        mask[i, : len(f)] = True
    own = torch.nonzero(head.bank_valid).flatten()[[0, 1, 2, 3]]
    groups = head.bank_groups[own]
    head.train()
    for _ in range(20):
        rows = head(x, mask, labels={"group": groups, "bank_row": own}).extras["exemplar_rows"][:, 0]
        typed_rows = groups >= 0
        assert bool((head.bank_groups[rows][typed_rows] == groups[typed_rows]).all())
        assert bool((rows != own).all())
    head.eval()
    with torch.inference_mode():
        out = head(x[:3], mask[:3], labels={"group": torch.tensor([0, 2, -1])})
        plain = head(x[:3], mask[:3])
    rows = out.extras["exemplar_rows"]
    assert rows.shape == (3, 8)
    assert bool((head.bank_groups[rows[0]] == 0).all()) and bool((head.bank_groups[rows[1]] == 2).all())
    assert torch.equal(rows[2], head.inference_exemplars()) and torch.equal(plain.extras["exemplar_rows"][0], rows[2])
    info = head.describe(out, 1)
    assert {e["group"] for e in info["exemplars"]} == {"t2"}

    matched = predict_set(head, te)
    unmatched = predict_set(head, test)  # no dive_type column: the fixed exemplars
    assert not np.allclose(matched, unmatched)
    assert spearman(matched, te.targets) > 0.8
    loaded = load_head(save_head(tmp_path / "typed.safetensors", [head], {"target": "dive_score"}))
    assert loaded.model.config.groups == ["t0", "t1", "t2"]
    np.testing.assert_allclose(predict_set(loaded.model, te), matched, atol=1e-3)
