"""The pose-guided exemplar head: planted structure it must learn (a score carried by some clips, step labels,
execution × difficulty), the exact decomposition, the exemplar bank in the checkpoint, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aqa_cli.dataset import load_feature_set
from aqa_cli.errors import AqaError, WeightsError
from aqa_cli.heads import create_head
from aqa_cli.heads.checkpoint import load_head, save_head
from aqa_cli.metrics import spearman
from aqa_cli.training import TrainSettings, fit, predict, predict_set
from conftest import write_labels_csv

STEPS = ["approach", "takeoff", "flight", "entry"]
DIM = 40
SMALL = {"in_dim": DIM, "hidden_dim": 64, "n_head": 4, "n_layers": 2, "dropout": 0.0, "k_exemplars": 8,
         "bank_size": 64, "step_classes": STEPS, "difficulty_column": "difficulty", "execution_min": 0.0,
         "execution_max": 30.0, "score_min": 0.0, "score_max": 120.0}
SETTINGS = TrainSettings(epochs=40, batch_size=16, optimizer="adamw", lr=1e-3, weight_decay=1e-2, crop=0,
                         eval_every=0)


def write_planted(folder, n: int, seed: int) -> list[dict]:
    """Dives of 5–9 clips: approach, takeoff, 1–5 flight clips, entry; each step shows as +2.5 on its own
    feature (8 + step). Execution quality q ~ U(0, 1) is carried by the flight clips only (feature 0 = 2q − 1
    plus noise there, pure noise elsewhere): execution = 10 + 15 q, dive score = execution × DD with DD drawn
    from 1.5–3.5 independently of q."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        flight = int(rng.integers(1, 6))
        steps = [0, 1] + [2] * flight + [3]
        x = rng.normal(0, 1, (len(steps), DIM)).astype(np.float32)
        q = float(rng.uniform(0, 1))
        for t, s in enumerate(steps):
            x[t, 8 + s] += 2.5
            if s == 2:
                x[t, 0] = (2 * q - 1) * 2.0 + rng.normal(0, 0.2)
        dd = float(rng.choice([1.5, 2.0, 2.5, 3.0, 3.5]))
        execution = 10.0 + 15.0 * q
        np.save(folder / f"d{i:03d}.npy", x)
        rows.append({"video": f"d{i:03d}", "dive_score": f"{execution * dd:.4f}", "difficulty": f"{dd}",
                     "steps": " ".join(STEPS[s] for s in steps), "execution": f"{execution:.4f}"})
    write_labels_csv(folder / "labels.csv", rows)
    return rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pose-planted")
    write_planted(root / "train", 160, seed=1)
    test_rows = write_planted(root / "test", 80, seed=2)
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

    # Step labels: per-clip accuracy on held-out dives, chance 0.25 (flight, the commonest, is about 0.43).
    # (not head.encode_labels: that would refill the bank from the test dives)
    from aqa_cli.heads.pose import _encode_steps

    truth = _encode_steps(head.config, test)
    correct = total = 0
    with torch.inference_mode():
        for i, f in enumerate(test.features):
            out = head(torch.tensor(f)[None])
            pred = out.extras["step_probs"][0].argmax(-1)
            correct += int((pred == truth[i, : len(f)]).sum())
            total += len(f)
    acc = correct / total
    print(f"step accuracy {acc:.3f} (chance 0.25)")
    assert acc > 0.8


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
    assert len(info["exemplars"]) == 8 and len(info["steps"]) == int(mask[0].sum())


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
        out = base(torch.from_numpy(train.features[0])[None])
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
