"""Label files, feature sets, `aqa train`, `aqa evaluate` and official head imports, on small synthetic data."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aqa_cli.dataset import load_feature_set, read_labels
from aqa_cli.errors import AqaError, FeatureError
from aqa_cli.heads import create_head
from aqa_cli.heads.checkpoint import import_official_head, load_head
from aqa_cli.training import fold_assignment
from conftest import invoke_aqa


def write_set(folder, n=24, dim=16, seed=0, min_clips=6, max_clips=12):
    """Features whose mean along feature 0 drives the score, with a CSV and a GDLT text label file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        t = int(rng.integers(min_clips, max_clips + 1))
        x = rng.normal(0, 1, (t, dim)).astype(np.float16 if i % 2 else np.float32)
        quality = float(rng.uniform(-1, 1))
        x[:, 0] += quality * 2
        np.save(folder / f"{i + 1}.npy", x)
        rows.append((str(i + 1), 20 + 10 * quality, 25 - 5 * quality, int(rng.integers(0, 2))))
    (folder / "labels.csv").write_text("video,TES,PCS,deductions\n" + "".join(f"{r[0]},{r[1]:.2f},{r[2]:.2f},{r[3]}\n" for r in rows))
    (folder / "labels.txt").write_text("".join(f"{r[0]} {r[1]:.2f} {r[2]:.2f} {r[3]}\n" for r in rows))
    return rows


def test_label_formats_keep_every_row(tmp_path):
    rows = write_set(tmp_path / "f", n=5)
    csv_labels = read_labels(tmp_path / "f" / "labels.csv")
    txt_labels = read_labels(tmp_path / "f" / "labels.txt")
    assert csv_labels.ids == txt_labels.ids == [r[0] for r in rows], "the first line of a header-less file is a video"
    np.testing.assert_allclose(txt_labels.target("TES"), [round(r[1], 2) for r in rows])
    np.testing.assert_allclose(csv_labels.target("pcs"), txt_labels.target("PCS"))
    rg = tmp_path / "rg.txt"
    rg.write_text("file_name\tDifficulty_Score\tExecution_Score\tTotal_Score\nBall_001\t8.1\t7.2\t15.3\nBall_002\t9\t8\t17\n")
    lab = read_labels(rg)
    assert lab.format == "rg" and lab.ids == ["Ball_001", "Ball_002"]
    np.testing.assert_allclose(lab.target("Total_Score"), [15.3, 17.0])


def test_bad_label_and_feature_sets_are_named_with_counts(tmp_path):
    write_set(tmp_path / "f", n=6)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(AqaError, match=r"empty.csv: the label file is empty \(0 rows\)"):
        read_labels(empty)
    extra = tmp_path / "extra.csv"
    extra.write_text((tmp_path / "f" / "labels.csv").read_text() + "99,20,20,0\n100,21,21,0\n")
    with pytest.raises(FeatureError, match=r"2 of 8 labelled video\(s\) have no feature file \(e.g. 99.npy\)"):
        load_feature_set(tmp_path / "f", extra, "TES")
    with pytest.raises(AqaError, match="no column 'GOE'"):
        load_feature_set(tmp_path / "f", tmp_path / "f" / "labels.csv", "GOE")
    # Feature files without a label are said, not silently dropped.
    short = tmp_path / "short.csv"
    short.write_text("video,TES\n1,20\n2,21\n3,22\n")
    fs = load_feature_set(tmp_path / "f", short, "TES")
    assert len(fs) == 3 and "3 feature file(s) have no row in short.csv" in fs.notes[0]
    bad = np.load(tmp_path / "f" / "2.npy").astype(np.float32)
    bad[1, 3] = np.nan
    np.save(tmp_path / "f" / "2.npy", bad)
    with pytest.raises(FeatureError, match=r"2.npy: 1 clip\(s\) contain NaN or inf"):
        load_feature_set(tmp_path / "f", tmp_path / "f" / "labels.csv", "TES")
    np.save(tmp_path / "f" / "2.npy", np.zeros((5, 8), np.float32))
    with pytest.raises(FeatureError, match=r"2.npy: features are 8-d but the head expects 16-d"):
        load_feature_set(tmp_path / "f", tmp_path / "f" / "labels.csv", "TES", expected_dim=16)


def test_folds_are_stratified_and_seeded():
    y = np.arange(103, dtype=float)
    a = fold_assignment(y, 5, seed=3)
    assert np.array_equal(a, fold_assignment(y, 5, seed=3))
    assert sorted(np.bincount(a)) == [20, 20, 21, 21, 21]
    for k in range(5):  # every fold spans the whole range
        assert y[a == k].min() < 10 and y[a == k].max() > 92


# The CLI in-process gets a fresh process's torch thread count; these heads are tiny, and train faster on one.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TRAIN_ARGS = ["--target", "TES", "--head", "gdlt", "--epochs", "3", "--seed", "7", "--device", "cpu",
              "--set", "hidden_dim=16", "--set", "dropout=0.0", "--set", "crop=8", "--set", "batch_size=8"]


def test_train_cross_validate_and_evaluate(tmp_path):
    write_set(tmp_path / "f")
    f = tmp_path / "f"
    ck = tmp_path / "m.safetensors"
    res = invoke_aqa("train", "--features", f, "--labels", f / "labels.csv", *TRAIN_ARGS, "--folds", "3",
                     "--out", ck, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    assert "3-fold cross-validation" in res.stdout and "mean ± std" in res.stdout
    log = json.loads(ck.with_suffix(".log.json").read_text())
    assert len(log["cv"]["fold_spearman"]) == 3 and log["n_videos"] == 24 and len(log["history"]) == 3
    loaded = load_head(ck)
    meta = loaded.metadata
    for key in ("head", "preset", "target", "scale", "contract", "data_sha256", "seed", "epochs", "cv", "aqa_version"):
        assert key in meta, key
    assert meta["seed"] == "7" and json.loads(meta["cv"])["folds"] == 3
    # The same seed gives the same model, byte for byte in its tensors.
    ck2 = tmp_path / "again.safetensors"
    res2 = invoke_aqa("train", "--features", f, "--labels", f / "labels.txt", *TRAIN_ARGS, "--out", ck2, env=ONE_THREAD)
    assert res2.returncode == 0, res2.stderr
    from safetensors.torch import load_file

    a, b = load_file(str(ck)), load_file(str(ck2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --cv-from takes the cross-validation over from the first run's log and trains only the final model:
    # the same model and the same figures as running both again.
    ck3 = tmp_path / "reused.safetensors"
    res3 = invoke_aqa("train", "--features", f, "--labels", f / "labels.csv", *TRAIN_ARGS, "--folds", "3",
                      "--cv-from", ck.with_suffix(".log.json"), "--out", ck3, env=ONE_THREAD)
    assert res3.returncode == 0, res3.stderr
    c = load_file(str(ck3))
    assert all(torch.equal(a[k], c[k]) for k in a)
    log3 = json.loads(ck3.with_suffix(".log.json").read_text())
    assert log3["cv"] == log["cv"] and log3["cv_reused_from"] == "m.log.json"
    assert json.loads(load_head(ck3).metadata["cv"]) == log["cv"]
    other = [a if a != "7" else "8" for a in TRAIN_ARGS]  # another seed: not the same job
    refused = invoke_aqa("train", "--features", f, "--labels", f / "labels.csv", *other, "--folds", "3",
                         "--cv-from", ck.with_suffix(".log.json"), "--out", tmp_path / "x.safetensors", env=ONE_THREAD)
    assert refused.returncode != 0 and "differs from this one in seed" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x.safetensors").exists()
    ev = invoke_aqa("evaluate", "--features", f, "--labels", f / "labels.csv", "--weights", ck, "--json",
                    env=ONE_THREAD)
    assert ev.returncode == 0, ev.stderr
    out = json.loads(ev.stdout)
    assert out["n"] == 24 and out["target"] == "TES"
    assert set(out) >= {"spearman", "pearson", "rl2_x100", "mae"}
    both = invoke_aqa("evaluate", "--features", f, "--labels", f / "labels.csv", "--weights", ck, "--weights", ck2,
                      "--target", "TES", "--target", "PCS", "--json", env=ONE_THREAD)
    assert both.returncode == 0, both.stderr
    payload = json.loads(both.stdout)
    rhos = [r["spearman"] for r in payload["results"]]
    assert payload["fisher_z_mean_spearman"] == pytest.approx(np.tanh(np.mean(np.arctanh(rhos))))
    # Several files after one flag, as the README writes it, is the same as repeating the flag (the explanations'
    # faithfulness, one head pass per clip, is measured above and has nothing to do with how flags are read).
    listed = invoke_aqa("evaluate", "--features", f, "--labels", f / "labels.csv", "--weights", ck, ck2, ck3,
                        "--json", "--no-explanations", env=ONE_THREAD)
    assert listed.returncode == 0, listed.stderr
    repeated = invoke_aqa("evaluate", "--features", f, "--labels", f / "labels.csv", "--weights", ck, "--weights", ck2,
                          "--weights", ck3, "--json", "--no-explanations", env=ONE_THREAD)
    assert json.loads(listed.stdout) == json.loads(repeated.stdout)
    assert [Path(r["weights"]).name for r in json.loads(listed.stdout)["results"]] == \
        ["m.safetensors", "again.safetensors", "reused.safetensors"]


def test_evaluate_refuses_features_that_break_the_contract(tmp_path):
    write_set(tmp_path / "f")
    ck = tmp_path / "m.safetensors"
    assert invoke_aqa("train", "--features", tmp_path / "f", "--labels", tmp_path / "f" / "labels.csv", *TRAIN_ARGS,
                      "--epochs", "1", "--out", ck, env=ONE_THREAD).returncode == 0
    write_set(tmp_path / "g", dim=24)
    res = invoke_aqa("evaluate", "--features", tmp_path / "g", "--labels", tmp_path / "g" / "labels.csv",
                     "--weights", ck, env=ONE_THREAD)
    assert res.returncode == 2
    assert "24 of 24 feature file(s) are 24-d" in res.stderr and "expects 16-d" in res.stderr
    # One error line (the progress lines a log file gets before it are not errors), never a traceback.
    assert "Traceback" not in res.stderr and len([ln for ln in res.stderr.splitlines() if ln.startswith("error")]) == 1


def reference_gdlt(state: dict, x: torch.Tensor, n_grades: int) -> torch.Tensor:
    """The official GDLT forward, rebuilt from torch's stock layers (not our module)."""
    hidden = state["prototype.weight"].shape[1]
    in_proj = nn.Sequential(nn.Conv1d(x.shape[-1], x.shape[-1] // 2, 1), nn.BatchNorm1d(x.shape[-1] // 2), nn.ReLU(),
                            nn.Conv1d(x.shape[-1] // 2, hidden, 1), nn.BatchNorm1d(hidden))
    tr = nn.Transformer(hidden, 1, 1, 2, 3 * hidden, 0.0, batch_first=True)
    in_proj.load_state_dict({k[len("in_proj."):]: v for k, v in state.items() if k.startswith("in_proj.")})
    tr.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    in_proj.eval(), tr.eval()
    with torch.no_grad():
        h = in_proj(x.transpose(1, 2)).transpose(1, 2)
        q = tr.decoder(state["prototype.weight"].unsqueeze(0), tr.encoder(h))
        s = torch.diagonal(q @ state["regressor.weight"].T + state["regressor.bias"], dim1=-2, dim2=-1)
        p = torch.sigmoid(s)
        p = p / p.sum(1, keepdim=True)
        return (p * torch.linspace(0, 1, n_grades)).sum(1)


def test_official_gdlt_checkpoint_imports_with_the_same_outputs(tmp_path):
    torch.manual_seed(3)
    donor = create_head("gdlt", {"in_dim": 32, "hidden_dim": 16})
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (donor.in_proj[1], donor.in_proj[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    state = {f"module.{k}": v.clone() for k, v in donor.state_dict().items()}  # as saved from nn.DataParallel
    official = tmp_path / "gdlt_best.pkl"
    torch.save(state, official)
    out = tmp_path / "imported.safetensors"
    res = invoke_aqa("weights", "import", official, "--name", "fisv-tes-official", "--format", "gdlt", "--out", out,
                     "--target", "TES")
    assert res.returncode == 0, res.stderr
    loaded = load_head(out)
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        ours = loaded.model(x).score
    ref = reference_gdlt({k.removeprefix("module."): v for k, v in state.items()}, x, 4)
    torch.testing.assert_close(ours, ref * 25, atol=1e-4, rtol=0)
    assert loaded.target == "TES" and json.loads(loaded.metadata["scale"])["score_max"] == 25.0


def test_official_import_refuses_code_and_wrong_models(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"in_proj.0.weight": Evil()}))
    with pytest.raises(AqaError, match="refused"):
        import_official_head(evil, "gdlt", tmp_path / "x.safetensors")
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(AqaError, match="is not an official gdlt checkpoint"):
        import_official_head(other, "gdlt", tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()


def test_repeated_cross_validation_draws_new_folds_and_keeps_every_repeats_predictions(tmp_path):
    from aqa_cli.training import REPEAT_SEED_STRIDE, TrainSettings, cross_validate, spearman

    write_set(tmp_path / "f", n=18)
    data = load_feature_set(tmp_path / "f", tmp_path / "f" / "labels.csv", "TES")
    config = {"in_dim": 16, "hidden_dim": 8, "dropout": 0.0, "score_min": 0.0, "score_max": 40.0}
    cv = cross_validate("additive", config, data, TrainSettings(epochs=2, batch_size=6, crop=6), folds=3, seed=3,
                        repeats=2, explain=False)
    assert cv.repeats == 2 and len(cv.fold_rhos) == 6 and len(cv.repeat_oof) == 2
    assert np.array_equal(cv.repeat_oof[0], cv.oof_predictions)
    for oof_r, rho in zip(cv.repeat_oof, cv.repeat_oof_rhos):
        assert np.isfinite(oof_r).all() and rho == pytest.approx(spearman(oof_r, data.targets))
    # Repeat r draws its folds from seed + r × stride: other folds, so other out-of-fold predictions.
    assert not np.array_equal(fold_assignment(data.targets, 3, 3), fold_assignment(data.targets, 3, 3 + REPEAT_SEED_STRIDE))
    assert not np.allclose(cv.repeat_oof[0], cv.repeat_oof[1])
