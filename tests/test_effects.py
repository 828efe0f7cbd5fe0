"""Explanations are claims, and these tests can catch a false one.

The metric (predicted against measured clip effects) has a positive control, a head that is additive by
construction (faithfulness 1), and a negative control, the same head with its explanation shuffled across
clips (faithfulness about 0). The measured effects ``aqa score`` reports are checked against an independent
recomputation, one clip removed at a time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aqa_cli import effects
from aqa_cli.effects import clip_effects, deletion_area, explanation_report, measured_effects
from aqa_cli.heads import HeadOutput, create_head
from aqa_cli.heads.checkpoint import load_head, save_head
from aqa_cli.metrics import faithfulness, predicted_effects
from conftest import CROSS_INSTANCE, invoke_aqa

DIM = 16


def additive_head(context: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    head = create_head("additive", {"in_dim": DIM, "hidden_dim": 12, "context": context, "dropout": 0.0,
                                    "score_min": 0.0, "score_max": 20.0})
    with torch.no_grad():  # untrained heads have near-uniform weights: spread them so effects differ
        head.weight_out.weight.mul_(8.0)
        head.score_out.weight.mul_(4.0)
        if context:
            head.context_conv.weight.normal_(0.0, 0.3)
    return head.eval()


def videos(n: int = 12, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(rng.integers(8, 30)), DIM)).astype(np.float32) for _ in range(n)]


class ShuffledExplanation(torch.nn.Module):
    """The same scores, with each video's weights and clip scores permuted across its clips: an explanation
    that still adds up to the score but says nothing about which clip does what."""

    def __init__(self, head: torch.nn.Module, seed: int = 0):
        super().__init__()
        self.head = head
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> HeadOutput:
        out = self.head(x, mask)
        if x.shape[0] != 1:  # only the explanation of the whole video is shuffled; scores stay the head's
            return out
        perm = torch.randperm(x.shape[1], generator=self.gen)
        return HeadOutput(score=out.score, weights=out.weights[:, perm], clip_scores=out.clip_scores[:, perm])


# ------------------------------------------------------------------------------------------------ the metric


def test_predicted_effect_formula_and_edge_cases():
    w = np.array([0.5, 0.3, 0.2])
    s = np.array([10.0, 4.0, 1.0])
    s0 = float(w @ s)
    np.testing.assert_allclose(predicted_effects(w, s), w * (s - s0) / (1 - w))
    assert np.isnan(predicted_effects(np.array([1.0]), np.array([3.0]))).all()  # a one-clip video
    assert faithfulness(np.zeros(5), np.arange(5.0)) == 0.0  # a constant explanation ranks nothing
    assert np.isnan(faithfulness(np.arange(2.0), np.arange(2.0)))  # two clips: nothing to rank
    assert faithfulness(np.arange(6.0), np.arange(6.0) ** 3) == pytest.approx(1.0)
    assert faithfulness(np.arange(6.0), -np.arange(6.0)) == pytest.approx(-1.0)


def test_positive_control_an_additive_head_is_faithful_by_construction():
    head = additive_head(context=0)
    rep = explanation_report(head, videos(), span=20.0)
    assert rep["faithfulness"] > 0.999 and rep["n"] == 12
    assert rep["deletion_area"] > 0  # removing the clips it names first moves the score faster than chance
    fx = clip_effects(head, videos(1)[0])
    # Exactly: removing clip t renormalises the softmax and leaves the others, so D = D^ (float32 rounding).
    np.testing.assert_allclose(fx.measured, fx.predicted, atol=1e-4)


def test_negative_control_a_shuffled_explanation_scores_about_zero():
    head = additive_head(context=0)
    shuffled = ShuffledExplanation(head)
    rep = explanation_report(shuffled, videos(40, seed=3), span=20.0)
    assert abs(rep["faithfulness"]) < 0.15, rep
    assert abs(rep["deletion_area"]) < explanation_report(head, videos(40, seed=3), span=20.0)["deletion_area"]


def test_context_makes_the_explanation_approximate_and_the_metric_says_so():
    exact = explanation_report(additive_head(context=0), videos(), span=20.0)["faithfulness"]
    with_context = explanation_report(additive_head(context=2), videos(), span=20.0)["faithfulness"]
    assert with_context < exact  # measured, not assumed: neighbours' features change when a clip goes


# ------------------------------------------------------------------------------------------------ measuring


def one_at_a_time(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """D_t recomputed the plain way: the head's forward on the video with clip t deleted, one clip at a time."""
    with torch.no_grad():
        full = float(head(torch.tensor(x)[None]).score)
        return np.array([full - float(head(torch.tensor(np.delete(x, t, axis=0))[None]).score)
                         for t in range(len(x))])


@pytest.mark.parametrize("name", ["gdlt", "cofinal", "interp", "additive"])
def test_measured_effects_equal_an_independent_recomputation(name, monkeypatch):
    torch.manual_seed(1)
    small = {"cofinal": {"n_subgrades": 8}}.get(name, {})  # its ETF needs as many dimensions as sub-grades
    head = create_head(name, {"in_dim": DIM, "hidden_dim": 16, "dropout": 0.0, "score_min": 0.0,
                              "score_max": 20.0, **small}).eval()
    x = videos(1, seed=5)[0]
    alone = one_at_a_time(head, x)
    assert np.ptp(alone) > 1e-4  # the clips do differ, so a wrong shortcut would show
    np.testing.assert_allclose(measured_effects(head, x), alone, **CROSS_INSTANCE)
    # Chunked (a few removed clips per batch) or not, the same effects.
    monkeypatch.setattr(effects, "CHUNK_FLOATS", 3 * (len(x) - 1) * DIM)
    np.testing.assert_allclose(measured_effects(head, x), alone, **CROSS_INSTANCE)
    if name == "additive":  # its one-pass exact path, and the batched passes it replaces, agree
        assert head.scores_without_each_clip(torch.tensor(x)) is not None
        monkeypatch.setattr(type(head), "scores_without_each_clip", lambda self, f: None)
        np.testing.assert_allclose(measured_effects(head, x), alone, **CROSS_INSTANCE)
    else:  # the per-clip steps applied once per video, and the whole head on every copy, agree
        assert head.map_each_clip(torch.tensor(x)[None]) is not None
        assert head.train().map_each_clip(torch.tensor(x)[None]) is None  # BatchNorm mixes clips in training
        head.eval()
        monkeypatch.setattr(type(head), "map_each_clip", lambda self, f: None)
        np.testing.assert_allclose(measured_effects(head, x), alone, **CROSS_INSTANCE)


def test_an_ensembles_effects_are_its_members_mean_and_match_a_recomputation():
    from aqa_cli.heads.checkpoint import HeadEnsemble

    members = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        members.append(create_head("gdlt", {"in_dim": DIM, "hidden_dim": 16, "dropout": 0.0, "score_min": 0.0,
                                            "score_max": 20.0}).eval())
    ensemble = HeadEnsemble(members).eval()
    x = videos(1, seed=7)[0]
    alone = one_at_a_time(ensemble, x)
    np.testing.assert_allclose(measured_effects(ensemble, x), alone, **CROSS_INSTANCE)
    np.testing.assert_allclose(alone, np.mean([one_at_a_time(m, x) for m in members], axis=0), **CROSS_INSTANCE)


def test_deletion_area_is_positive_for_the_true_order_and_not_for_its_reverse():
    head = additive_head()
    x = videos(1, seed=2)[0]
    fx = clip_effects(head, x)
    good = deletion_area(head, x, fx.predicted, 20.0)
    # An explanation that names the least important clips first.
    bad = deletion_area(head, x, 1.0 / (np.abs(fx.predicted) + 1e-6), 20.0)
    assert good > 0 > bad


def test_one_clip_video_has_no_effects():
    head = additive_head()
    fx = clip_effects(head, videos(1)[0][:1])
    assert np.isnan(fx.measured).all() and np.isnan(fx.faithfulness)


# ------------------------------------------------------------------------------------------------ in aqa score


def test_score_json_effects_match_an_independent_recomputation(tmp_path):
    torch.manual_seed(0)
    head = create_head("gdlt", {"in_dim": 1024, "hidden_dim": 32, "dropout": 0.0, "score_min": 0.0,
                                "score_max": 40.0}).eval()
    ck = save_head(tmp_path / "g.safetensors", [head], {
        "preset": "fisv-pcs", "target": "PCS", "scale": {"score_min": 0.0, "score_max": 40.0, "unit": "points"},
        "contract": {"backbone": "i3d", "feature_dim": 1024, "recipe": "i3d-deepmind"}})
    x = np.random.default_rng(4).normal(size=(9, 1024)).astype(np.float32)
    np.save(tmp_path / "v.npy", x)
    res = invoke_aqa("score", tmp_path / "v.npy", "--weights", ck, "--backbone", "i3d", "--json",
                     "--clips-csv", tmp_path / "clips.csv")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    loaded = load_head(ck)
    with torch.no_grad():
        full = float(loaded.model(torch.tensor(x)[None]).score)
        want = [full - float(loaded.model(torch.tensor(np.delete(x, t, axis=0))[None]).score) for t in range(len(x))]
    got = [c["effect"] for c in obj["clips"]]
    np.testing.assert_allclose(got, want, atol=1e-4)
    pred = predicted_effects(np.array([c["weight"] for c in obj["clips"]]), np.array([c["score"] for c in obj["clips"]]))
    np.testing.assert_allclose([c["predicted_effect"] for c in obj["clips"]], pred, atol=1e-6)
    assert obj["faithfulness"] == pytest.approx(faithfulness(pred, np.array(want)), abs=0.05)
    assert isinstance(obj["explanation_faithful"], bool)
    import pandas as pd

    clips = pd.read_csv(tmp_path / "clips.csv")
    np.testing.assert_allclose(clips.effect.to_numpy(), got, atol=1e-9)


def test_table_says_plainly_when_the_weights_are_not_the_reason():
    from pathlib import Path

    from aqa_cli.report import explanation_line
    from aqa_cli.scoring import ClipScore, VideoScore

    r = VideoScore(input=Path("v.mp4"), status="ok", score=10.0,
                   clips=[ClipScore(i, i, i + 1, 0.25, 10.0, effect=0.1 * i) for i in range(4)], faithfulness=0.1)
    assert not r.explanation_faithful and "do NOT say" in explanation_line(r)
    r.faithfulness = 0.95
    assert r.explanation_faithful and "faithful" in explanation_line(r)


# ---------------------------------------------------------------- the additive head with its linear probe


def probe_data(n: int = 30, seed: int = 0):
    """Videos whose score is linear in their mean clip feature plus noise, as a FeatureSet."""
    from pathlib import Path

    from aqa_cli.dataset import FeatureSet

    rng = np.random.default_rng(seed)
    feats = [rng.normal(size=(int(rng.integers(5, 12)), DIM)).astype(np.float32) for _ in range(n)]
    beta = rng.normal(size=DIM)
    targets = np.array([10 + 3 * f.mean(0) @ beta + rng.normal(scale=0.3) for f in feats])
    return FeatureSet(ids=[str(i) for i in range(n)], features=feats, targets=targets, feature_dir=Path("."),
                      labels_path=Path("labels.csv"), target_name="score")


@torch.no_grad()
def test_the_probe_is_the_ridge_on_video_means_and_the_blend_scores_exactly_without_each_clip(tmp_path):
    from aqa_cli.heads.additive import ridge_on_video_means

    data = probe_data()
    head = create_head("additive", {"in_dim": DIM, "hidden_dim": 12, "dropout": 0.0, "score_min": 0.0,
                                    "score_max": 20.0, "probe_share": 0.4}).eval()
    plain = float(head(torch.tensor(data.features[0])[None]).score)  # before fitting: the additive part alone
    head.fit_closed_form(data)
    means = np.stack([f.astype(np.float64).mean(0) for f in data.features])
    w, b, alpha = ridge_on_video_means(means, data.targets, None)
    # The ridge against numpy's solve of its normal equations on standardised columns, at the chosen strength.
    mu, sd = means.mean(0), means.std(0) + 1e-6
    z = (means - mu) / sd
    ref = np.linalg.solve(z.T @ z + alpha * np.eye(DIM), z.T @ (data.targets - data.targets.mean()))
    np.testing.assert_allclose(w, ref / sd, rtol=1e-6, atol=1e-9)
    assert np.corrcoef(means @ w + b, data.targets)[0, 1] > 0.9
    x = torch.tensor(data.features[0])
    out = head(x[None])
    probe = float((x.double() @ torch.as_tensor(w) + b).mean())
    assert float(out.score) == pytest.approx(0.6 * plain + 0.4 * probe, rel=1e-5)
    assert float((out.weights * out.clip_scores).sum()) == pytest.approx(float(out.score), rel=1e-5)
    assert float(out.weights.sum()) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(measured_effects(head, data.features[0]), one_at_a_time(head, data.features[0]),
                               **CROSS_INSTANCE)
    fx = clip_effects(head, data.features[0])
    assert fx.faithfulness > 0.9  # two true explanations summed: close to true, and measured
    # The probe travels in the checkpoint.
    path = save_head(tmp_path / "probe.safetensors", [head], {"target": "score"})
    assert float(load_head(path).model(x[None]).score) == pytest.approx(float(out.score), rel=1e-6)


def test_fitting_the_probe_leaves_the_trained_part_bit_for_bit_unchanged():
    from aqa_cli.training import TrainSettings, fit

    data = probe_data(n=16, seed=3)
    base = {"in_dim": DIM, "hidden_dim": 8, "dropout": 0.0, "score_min": 0.0, "score_max": 20.0}
    settings = TrainSettings(epochs=2, batch_size=4, crop=4, optimizer="adamw", lr=1e-3)
    plain = fit("additive", base, data, settings, seed=5).head
    blended = fit("additive", {**base, "probe_share": 0.5}, data, settings, seed=5).head
    a, b = plain.state_dict(), blended.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert bool(blended.probe_fitted) and float(blended.probe_weight.abs().sum()) > 0
