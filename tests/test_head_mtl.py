"""The multitask (C3D-AVG) head: planted structure it must learn (score, action classes, captions), the
exact decomposition with its additive term, label files and their errors, the MTL-AQA pickle converter,
checkpoints that carry the vocabulary and schema, and `aqa train` / `aqa score` with it."""

from __future__ import annotations

import copy
import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch

from aqa_cli.dataset import convert_mtl_aqa, load_feature_set, read_labels
from aqa_cli.errors import AqaError
from aqa_cli.heads import create_head
from aqa_cli.heads.checkpoint import load_head, save_head
from aqa_cli.heads.mtl import ADDITIVE, build_vocab, tokenize
from aqa_cli.metrics import spearman
from aqa_cli.training import TrainSettings, fit
from conftest import assert_close_across_instances, assert_same_model, invoke_aqa, write_labels_csv

POSITIONS = ["free", "tuck", "pike"]
SCHEMA = [{"name": "position", "classes": POSITIONS},
          {"name": "armstand", "classes": ["no", "yes"], "display": ["no armstand", "armstand"]}]
SMALL = {"in_dim": 16, "hidden_dim": 32, "dropout": 0.0, "score_min": 0.0, "score_max": 100.0,
         "subtasks": SCHEMA, "caption_hidden": 32, "word_dim": 16, "max_caption_len": 12}
SETTINGS = TrainSettings(epochs=60, batch_size=16, optimizer="adam", lr=3e-3, weight_decay=0.0, crop=0,
                         eval_every=0)


def rule_caption(position: int, armstand: int) -> str:
    return f"a {POSITIONS[position]} dive, {'with' if armstand else 'without'} armstand"


def write_planted(folder, n: int, seed: int, dim: int = 16, captions: bool = True):
    """Videos of 4–8 clips. The score is 50 + 40 × (feature 0 averaged over the clips): a property of each
    clip. The position shows as +2 on feature 1 + position in every clip, the armstand as ±2 on feature 4,
    and the caption is a fixed sentence naming both."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        t = int(rng.integers(4, 9))
        x = rng.normal(0, 1, (t, dim)).astype(np.float32)
        pos, arm = int(rng.integers(3)), int(rng.integers(2))
        x[:, 1 + pos] += 2.0
        x[:, 4] += 2.0 if arm else -2.0
        score = 50.0 + 40.0 * float(x[:, 0].mean())
        np.save(folder / f"v{i:03d}.npy", x)
        rows.append({"video": f"v{i:03d}", "final_score": f"{score:.3f}", "position": POSITIONS[pos],
                     "armstand": ["no", "yes"][arm], "caption": rule_caption(pos, arm) if captions else ""})
    write_labels_csv(folder / "labels.csv", rows)
    return rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One head trained on 120 planted videos, and 60 held-out ones."""
    root = tmp_path_factory.mktemp("mtl")
    write_planted(root / "train", 120, seed=0)
    held_rows = write_planted(root / "test", 60, seed=1)
    train = load_feature_set(root / "train", root / "train" / "labels.csv", "final_score")
    test = load_feature_set(root / "test", root / "test" / "labels.csv", "final_score")
    res = fit("mtl", dict(SMALL), train, SETTINGS, seed=0)
    return {"root": root, "head": res.head, "history": res.history, "test": test, "rows": held_rows,
            "seconds": res.seconds}


def outputs(head, data):
    head.eval()
    with torch.no_grad():
        return [head(torch.tensor(np.asarray(f, dtype=np.float32)).unsqueeze(0)) for f in data.features]


def test_planted_score_classes_and_captions_are_learned(planted):
    head, test, rows = planted["head"], planted["test"], planted["rows"]
    assert head.config.vocab, "the vocabulary was built from the training captions"
    assert {"aqa", "cls", "cap"} <= set(planted["history"][-1]), "every task entered the loss"
    outs = outputs(head, test)
    pred = np.array([float(o.score[0]) for o in outs])
    rho = spearman(pred, test.targets)
    acc = {s["name"]: np.mean([head.describe(o)["action"][k]["class"] == r[s["name"]] for o, r in zip(outs, rows)])
           for k, s in enumerate(SCHEMA)}
    greedy = [head.describe(o)["commentary"] for o in outs]
    exact = np.mean([g.split() == tokenize(r["caption"]) for g, r in zip(greedy, rows)])
    head.config.beam_size = 3
    try:
        beam = [" ".join(head.words(head.generate(o.extras["caption_state"])[0])) for o in outs]
    finally:
        head.config.beam_size = 1
    exact_beam = np.mean([b.split() == tokenize(r["caption"]) for b, r in zip(beam, rows)])
    print(f"\nplanted (held-out 60): rho {rho:.3f}; accuracy position {acc['position']:.2f} (chance 0.33), "
          f"armstand {acc['armstand']:.2f} (chance 0.50); captions exact greedy {exact:.2f}, beam {exact_beam:.2f}; "
          f"e.g. {greedy[0]!r} for {rows[0]['caption']!r}; trained in {planted['seconds']:.1f} s")
    assert rho > 0.9
    assert acc["position"] > 0.8 and acc["armstand"] > 0.9
    assert exact > 0.8 and exact_beam > 0.8


def test_per_clip_scores_follow_the_planted_clip_property(planted):
    """The clip score is the score head on one clip: it must rank clips by their own feature 0."""
    head, test = planted["head"], planted["test"]
    outs = outputs(head, test)
    clip_s = np.concatenate([o.clip_scores[0].numpy() for o in outs])
    clip_q = np.concatenate([np.asarray(f)[:, 0] for f in test.features])
    assert spearman(clip_s, clip_q) > 0.8


@pytest.mark.parametrize("body", ["mlp", "linear"])
def test_shapes_masks_and_exact_decomposition(body):
    torch.manual_seed(0)
    head = create_head("mtl", {**SMALL, "body": body, "vocab": ["a", "dive"]}).eval()
    lengths = [7, 3, 5]
    x = torch.randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        x[i, n:] = float("nan")  # nothing in padding may leak, not even NaN
    with torch.no_grad():
        out = head(x, mask)
    assert out.score.shape == (3,) and out.weights.shape == out.clip_scores.shape == (3, 7)
    torch.testing.assert_close(out.weights, mask.float() / mask.sum(1, keepdim=True))
    assert torch.all(out.clip_scores[~mask] == 0) and torch.isfinite(out.score).all()
    recon = (out.weights * out.clip_scores).sum(1) + out.additive_total()
    torch.testing.assert_close(recon, out.score, atol=1e-5, rtol=0)
    gap = out.additive[ADDITIVE].abs()
    if body == "linear":
        assert float(gap.max()) < 1e-4, "a linear body's clip scores add up by themselves"
        assert head.describe(out)["clip_scores_sum_exactly"] is True
    else:
        assert float(gap.max()) > 1e-3, "a ReLU body does not commute with the average"
        assert "does not equal the total" in head.describe(out)["decomposition"]
    assert {f"probs.{s['name']}" for s in SCHEMA} <= set(out.extras)
    assert out.extras["caption_tokens"].shape[0] == 3
    with torch.no_grad():
        for i, n in enumerate(lengths):  # a video scores the same alone as in a padded batch
            alone = head(x[i:i + 1, :n])
            torch.testing.assert_close(alone.score, out.score[i:i + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.extras["caption_state"], out.extras["caption_state"][i:i + 1],
                                       atol=1e-5, rtol=0)
    with pytest.raises(AqaError, match=r"\[B, T, 16\]"):
        head(torch.randn(1, 4, 8))


def test_tasks_without_labels_drop_out_of_the_loss(tmp_path):
    """Scores alone: no class or caption column. Some cells empty: those videos leave that task only."""
    write_planted(tmp_path / "a", 12, seed=3, captions=False)
    lab = tmp_path / "a" / "scores.csv"
    rows = list(csv.DictReader(open(tmp_path / "a" / "labels.csv")))
    lab.write_text("video,final_score\n" + "".join(f"{r['video']},{r['final_score']}\n" for r in rows))
    data = load_feature_set(tmp_path / "a", lab, "final_score")
    quick = TrainSettings(epochs=2, batch_size=6, optimizer="adam", lr=1e-3, crop=0, eval_every=0)
    res = fit("mtl", dict(SMALL), data, quick, seed=0)
    assert set(res.history[-1]) & {"aqa", "cls", "cap"} == {"aqa"}
    assert res.head.config.vocab == [] and res.head.describe(outputs(res.head, data)[0])["commentary"] is None

    partial = load_feature_set(tmp_path / "a", tmp_path / "a" / "labels.csv", "final_score")
    partial.aux["position"] = ["" if i % 2 else v for i, v in enumerate(partial.aux["position"])]
    head = create_head("mtl", dict(SMALL)).train()
    labels = head.encode_labels(partial)
    assert labels["cls.position"].tolist()[1::2] == [-1] * 6 and "caption" not in labels
    x = torch.randn(2, 4, 16)
    out = head(x)
    # Both videos of this batch lack the position: the classification loss has only the armstand term.
    only_arm = {"cls.position": torch.tensor([-1, -1]), "cls.armstand": torch.tensor([0, 1])}
    _, parts = head.loss(out, torch.tensor([40.0, 60.0]), only_arm)
    want = torch.nn.functional.cross_entropy(out.extras["logits.armstand"], torch.tensor([0, 1]))
    assert parts["cls"] == pytest.approx(float(want.detach()), rel=1e-6)


def test_unknown_class_and_vocabulary_mismatch_are_one_line_errors(tmp_path):
    write_planted(tmp_path / "d", 8, seed=4)
    bad = tmp_path / "d" / "bad_class.csv"
    text = (tmp_path / "d" / "labels.csv").read_text().replace(",pike,", ",spiral,", 1)
    assert ",spiral," in text
    bad.write_text(text)
    data = load_feature_set(tmp_path / "d", bad, "final_score")
    quick = TrainSettings(epochs=1, batch_size=4, crop=0, eval_every=0)
    with pytest.raises(AqaError) as exc:
        fit("mtl", dict(SMALL), data, quick)
    msg = exc.value.message
    assert "\n" not in msg and "bad_class.csv" in msg and "unknown position class (e.g. 'spiral' for id" in msg
    assert "known: free, tuck, pike" in msg and "add the class" in msg

    good = load_feature_set(tmp_path / "d", tmp_path / "d" / "labels.csv", "final_score")
    with pytest.raises(AqaError) as exc:
        fit("mtl", {**SMALL, "vocab": ["a", "dive", "with", "without", "armstand", "free"]}, good, quick)
    msg = exc.value.message
    assert "\n" not in msg and "labels.csv" in msg and "outside the head's caption vocabulary" in msg
    assert "vocab setting" in msg
    with pytest.raises(AqaError, match="needs at least two distinct class names"):
        create_head("mtl", {**SMALL, "subtasks": [{"name": "position", "classes": ["pike"]}]})


def test_checkpoint_round_trip_keeps_vocabulary_and_schema(planted, tmp_path):
    head, test = planted["head"], planted["test"]
    path = save_head(tmp_path / "mtl.safetensors", [head], {"target": "final_score",
                                                             "contract": {"backbone": "i3d", "feature_dim": 16}})
    loaded = load_head(path)
    assert loaded.config["vocab"] == head.config.vocab and loaded.config["subtasks"] == SCHEMA
    x = torch.tensor(np.asarray(test.features[0], dtype=np.float32)).unsqueeze(0)
    assert_same_model(loaded.model, head)
    with torch.no_grad():
        a, b = head(x), loaded.model(x)
    # Two instances: scores within the cross-instance tolerance; the greedy commentary is discrete and the same.
    assert_close_across_instances(b.score, a.score)
    assert torch.equal(a.extras["caption_tokens"], b.extras["caption_tokens"])
    assert loaded.model.describe(b) == head.describe(a)
    # Two members: class probabilities are averaged, the decomposition still adds up.
    both = load_head(save_head(tmp_path / "two.safetensors", [head, copy.deepcopy(head)], {"target": "final_score"}))
    with torch.no_grad():
        out = both.model(x)
    torch.testing.assert_close((out.weights * out.clip_scores).sum(1) + out.additive_total(), out.score)
    assert both.model.describe(out)["action_text"] == head.describe(a)["action_text"]


def test_training_is_deterministic(tmp_path):
    write_planted(tmp_path / "s", 12, seed=5)
    data = load_feature_set(tmp_path / "s", tmp_path / "s" / "labels.csv", "final_score")
    quick = TrainSettings(epochs=3, batch_size=5, optimizer="adam", lr=1e-3, crop=0, eval_every=0)
    a = fit("mtl", dict(SMALL), data, quick, seed=7).head.state_dict()
    b = fit("mtl", dict(SMALL), data, quick, seed=7).head.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert build_vocab(["b a", "a c"]) == build_vocab(["a c", "b a"]) == ["a", "b", "c"]


def test_json_labels_and_the_mtl_aqa_converter(tmp_path):
    ann = {(1, 2): {"final_score": np.float64(71.4), "difficulty": 3.0, "position": np.int64(2), "armstand": 0,
                    "rotation_type": 1, "ss_no": 7, "tw_no": 2, "primary_view": 0},
           (1, 1): {"final_score": 45.0, "difficulty": 2.8, "position": 1, "armstand": 1, "rotation_type": 0,
                    "ss_no": 3, "tw_no": 0, "primary_view": 0}}
    caps = {(1, 2): "a pike dive, well done", (1, 1): ["tucked", "<eos>"]}
    for name, obj in (("final_annotations_dict.pkl", ann), ("final_captions_dict.pkl", caps),
                      ("train_split_0.pkl", [(1, 2), (1, 1)])):
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=2))
    from aqa_cli.heads.mtl import check_schema
    from aqa_cli.presets import load_preset

    schema = check_schema(load_preset("mtl-aqa").model_settings("mtl")["subtasks"])
    out = tmp_path / "labels.csv"
    summary = convert_mtl_aqa(tmp_path / "final_annotations_dict.pkl", out,
                              captions=tmp_path / "final_captions_dict.pkl", split=tmp_path / "train_split_0.pkl",
                              subtasks=schema)
    assert {k: summary[k] for k in ("rows", "captions", "out")} == {"rows": 2, "captions": 2, "out": str(out)}
    assert all(r["verdict"] == "no evidence" for r in summary["caption_check"])  # 2 captions prove nothing
    lab = read_labels(out)
    assert lab.ids == ["01_01", "01_02"]
    np.testing.assert_allclose(lab.target("final_score"), [45.0, 71.4])
    assert lab.text["position"] == ["tuck", "pike"] and lab.text["ss_no"] == ["1.5", "3.5"]
    assert lab.text["tw_no"] == ["0", "1"] and lab.text["armstand"] == ["yes", "no"]
    assert lab.text["caption"] == ["tucked", "a pike dive, well done"]

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({(1, 1): {"x": os.system}}))
    with pytest.raises(AqaError) as exc:
        convert_mtl_aqa(evil, tmp_path / "never.csv")
    assert "evil.pkl" in exc.value.message and "\n" not in exc.value.message and not (tmp_path / "never.csv").exists()

    js = tmp_path / "labels.json"
    js.write_text(json.dumps([{"video": "v1", "final_score": 60, "caption": ["a", "tuck", "dive"]},
                              {"video": "v2", "final_score": 61.5, "position": "pike", "caption": "b, c"}]))
    lab = read_labels(js)
    assert lab.format == "json" and lab.ids == ["v1", "v2"] and lab.text["caption"] == ["a tuck dive", "b, c"]
    assert lab.text["position"] == ["", "pike"]
    np.testing.assert_allclose(lab.target("final_score"), [60.0, 61.5])


def _release_with_captions(folder, rotation_words: list[str], n: int = 120, seed: int = 0):
    """An MTL-AQA-like release whose commentators name each dive: code k of rotation_type is called
    rotation_words[k]; positions are named as the preset orders them; armstand dives say "armstand"."""
    rng = np.random.default_rng(seed)
    ann, caps = {}, {}
    for i in range(n):
        rot, pos, arm = int(rng.integers(4)), int(rng.integers(3)), int(rng.random() < 0.2)
        ann[(1 + i // 50, 1 + i % 50)] = {"final_score": 50.0, "difficulty": 3.0, "position": pos, "armstand": arm,
                                            "rotation_type": rot, "ss_no": 3, "tw_no": 0}
        words = ["a", rotation_words[rot], "two and a half", ["free", "tucked", "piked"][pos]]
        if arm:
            words.insert(1, "armstand")
        if rng.random() < 0.3:
            words = ["what", "a", "splash"]  # a caption naming nothing
        caps[list(ann)[-1]] = " ".join(words)
    (folder / "ann.pkl").write_bytes(pickle.dumps(ann, protocol=2))
    (folder / "caps.pkl").write_bytes(pickle.dumps(caps, protocol=2))


def test_caption_check_of_the_class_order(tmp_path):
    """convert-labels reads the captions to say whether code k is really the preset's class k; a release whose
    rotation codes are ordered otherwise is caught, and said so on the command line."""
    _release_with_captions(tmp_path, ["forward", "back", "reverse", "inward"])
    res = invoke_aqa("convert-labels", tmp_path / "ann.pkl", "--captions", tmp_path / "caps.pkl", "--out",
                     tmp_path / "labels.csv")
    assert res.returncode == 0, res.stderr
    assert "agrees" in res.stdout and "disagrees" not in res.stdout and "warning" not in res.stdout

    other = tmp_path / "other"
    other.mkdir()
    _release_with_captions(other, ["inward", "reverse", "back", "forward"])
    from aqa_cli.heads.mtl import check_schema
    from aqa_cli.presets import load_preset

    schema = check_schema(load_preset("mtl-aqa").model_settings("mtl")["subtasks"])
    summary = convert_mtl_aqa(other / "ann.pkl", other / "labels.csv", captions=other / "caps.pkl", subtasks=schema)
    verdicts = {(r["subtask"], r["code"]): r for r in summary["caption_check"]}
    assert [verdicts[("rotation_type", k)]["verdict"] for k in range(4)] == ["disagrees"] * 4
    assert [verdicts[("rotation_type", k)]["most_named"] for k in range(4)] == ["inward", "reverse", "back", "forward"]
    assert all(verdicts[("position", k)]["verdict"] == "agrees" for k in range(3))
    assert verdicts[("armstand", 0)]["verdict"] == verdicts[("armstand", 1)]["verdict"] == "agrees"
    assert {r["subtask"] for r in summary["caption_check"]} == {"rotation_type", "position", "armstand"}
    res = invoke_aqa("convert-labels", other / "ann.pkl", "--captions", other / "caps.pkl", "--out", other / "l2.csv")
    assert res.returncode == 0 and "disagree with preset mtl-aqa's class order for rotation_type" in " ".join(
        res.stdout.split())

    bad = [{"name": "position", "classes": ["a", "b"], "cues": [["x"]]}]
    with pytest.raises(AqaError, match="cues must list one list of words per class"):
        check_schema(bad)


def test_train_and_score_from_the_command_line(tmp_path):
    """`aqa train --head mtl --preset mtl-aqa` reads the extra columns; `aqa score` names the action, writes the
    commentary and says how the clip scores relate to the total."""
    write_planted(tmp_path / "f", 24, seed=6, dim=1024)
    ckpt = tmp_path / "mtl.safetensors"
    res = invoke_aqa("train", "--features", tmp_path / "f", "--labels", tmp_path / "f" / "labels.csv",
                     "--target", "final_score", "--head", "mtl", "--preset", "mtl-aqa", "--epochs", "8",
                     "--set", "hidden_dim=16", "--set", "caption_hidden=16", "--set", "word_dim=8",
                     "--set", "caption_layers=1", "--set", "batch_size=8", "--set", "lr=0.003",
                     "--set", 'subtasks=[{"name": "position", "classes": ["free", "tuck", "pike"]}]',
                     "--out", ckpt, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    loaded = load_head(ckpt)
    assert loaded.config["vocab"] and loaded.config["subtasks"][0]["name"] == "position"
    log = json.loads(ckpt.with_suffix(".log.json").read_text())
    assert {"aqa", "cls", "cap"} <= set(log["history"][-1])
    res = invoke_aqa("score", tmp_path / "f" / "v000.npy", "--weights", ckpt, "--backbone", "i3d", "--no-cache",
                     env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "action: " in text and "commentary: " in text and "nonlinear_body" in text
    assert "does not equal the total" in text
