"""Intervals, ranks and the domain check (aqa_cli/calibration.py), and the fisv preset's whole result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aqa_cli.calibration import (
    Calibration, DomainModel, conformal_quantile, read_calibration, read_domain, rewrite_head_file, shown_digits,
    store_in_head, video_descriptor,
)
from aqa_cli.heads import create_head
from aqa_cli.heads.checkpoint import load_head, save_head, shipped_dir
from aqa_cli.presets import load_preset
from aqa_cli.weights import read_safetensors
from conftest import invoke_aqa


def test_the_finite_sample_quantile():
    scores = np.arange(1.0, 10.0)  # n = 9: ⌈10 · 0.9⌉ = 9, the largest
    assert conformal_quantile(scores, 0.9) == 9.0
    assert conformal_quantile(scores, 0.5) == 5.0  # ⌈10 · 0.5⌉ = 5
    assert math.isinf(conformal_quantile(scores[:8], 0.9))  # ⌈9 · 0.9⌉ = 9 > 8: no finite interval exists
    with pytest.raises(Exception, match="between 0 and 1"):
        conformal_quantile(scores, 1.5)


def test_coverage_holds_on_exchangeable_data():
    rng = np.random.default_rng(0)
    y = rng.normal(size=600)
    oof = y + rng.normal(size=600)
    cal = Calibration([str(i) for i in range(400)], y[:400], oof[None, :400])
    hw = cal.half_width(0.9)
    assert np.mean(np.abs(oof[400:] - y[400:]) <= hw) == pytest.approx(0.9, abs=0.05)
    cv = cal.cv_coverage(0.9, repeats=5)
    assert cv["coverage"] == pytest.approx(0.9, abs=0.03) and cv["mean_width"] == pytest.approx(2 * hw, rel=0.1)
    back = Calibration.from_json(cal.to_json())
    assert back.half_width(0.9) == pytest.approx(hw, abs=1e-3)
    assert cal.rank(0.0)["below"] == pytest.approx(np.mean(y[:400] < 0))
    # The total pairs the videos: the sum of two identical heads has twice the residuals.
    assert cal.combined(cal).half_width(0.9) == pytest.approx(2 * hw)
    assert shown_digits(7.9) == 0 and shown_digits(0.5) == 1 and shown_digits(0.05) == 2


def test_the_interval_stays_on_the_scale():
    cal = Calibration(["a", "b"] * 10, np.zeros(20), np.linspace(-3, 3, 20)[None, :])
    i = cal.interval(1.0, 0.9, {"min": 0.0, "max": 10.0})
    assert i["low"] == 0.0 and i["high"] == pytest.approx(1.0 + i["half_width"])


def test_domain_flags_what_is_unlike_training():
    rng = np.random.default_rng(1)
    base = rng.normal(size=64) * 3
    videos = [base + rng.normal(size=(int(rng.integers(20, 40)), 64)) for _ in range(150)]
    model = DomainModel.fit_calibrated(np.stack([video_descriptor(v) for v in videos[:120]]))
    held = [model.check(v)["in_domain"] for v in videos[120:]]
    assert np.mean(held) >= 0.9
    perm = rng.permutation(64)
    assert not any(model.check(v[:, perm])["in_domain"] for v in videos[120:])
    assert not any(model.check(np.repeat(v[:1], len(v), 0))["in_domain"] for v in videos[120:])


def _small_head(path):
    torch.manual_seed(0)
    head = create_head("additive", load_preset("fisv-pcs").model_settings("additive")).eval()
    return save_head(path, [head], {"preset": "fisv-pcs", "target": "PCS",
                                    "scale": {"score_min": 0.0, "score_max": 40.0},
                                    "contract": {"backbone": "vst", "feature_dim": 1024}}, half=True)


def test_calibration_is_stored_without_touching_the_weights(tmp_path):
    path = _small_head(tmp_path / "h.safetensors")
    before, _ = read_safetensors(path)
    rng = np.random.default_rng(0)
    cal = Calibration([str(i) for i in range(50)], rng.normal(size=50), rng.normal(size=(2, 50)))
    domain = DomainModel.fit_calibrated(rng.normal(size=(30, 8)))
    store_in_head(path, cal, domain)
    after, meta = read_safetensors(path)
    assert all(before[k].dtype == after[k].dtype and before[k].equal(after[k]) for k in before)
    assert set(after) - set(before) == {f"domain.{k}" for k in domain.tensors()}
    loaded = load_head(path)  # the head still loads: the domain tensors are not a member's
    assert read_calibration(loaded.metadata).half_width(0.8) == pytest.approx(cal.half_width(0.8), abs=1e-3)
    assert read_domain(path, loaded.metadata).held_out_scores == pytest.approx(domain.held_out_scores)
    rewrite_head_file(path, {"note": "x"}, {})  # a second rewrite keeps what the first stored
    assert read_safetensors(path)[1]["note"] == "x" and read_domain(path, load_head(path).metadata) is not None


def test_a_head_without_calibration_shows_no_interval(tmp_path):
    from aqa_cli.scoring import VideoScore, attach_trust, head_trust

    loaded = load_head(_small_head(tmp_path / "bare.safetensors"))
    calibration, domain, missing = head_trust(loaded)
    assert calibration is None and domain is None and "no calibration data" in missing
    result = VideoScore(input=tmp_path / "x.npy", status="ok", score=20.0, scale={"min": 0.0, "max": 40.0})
    attach_trust(result, calibration, domain, 0.9, missing=missing)
    d = result.to_dict()
    assert d["interval"] is None and "no calibration data" in d["interval_missing"]


@pytest.fixture(scope="module")
def fisv_video(shared):
    return shared / "data" / "fisv" / "features" / "1.npy"


def test_fisv_gives_tes_pcs_and_their_total(fisv_video, tmp_path):
    if not (shipped_dir() / "fisv-tes-additive.safetensors").is_file():
        pytest.skip("the shipped Fis-V heads are absent")
    res = invoke_aqa("score", fisv_video, "--backbone", "vst", "--preset", "fisv", "--json", "--no-cache")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["target"] for r in rows] == ["TES", "PCS", "total"]
    tes, pcs, total = rows
    assert total["score"] == pytest.approx(tes["score"] + pcs["score"])
    for r in rows:
        i = r["interval"]
        assert i["level"] == 0.9 and i["low"] < r["score"] < i["high"] and i["method"].startswith("split-conformal")
        assert r["domain"]["in_domain"] and 0 < r["rank"]["below"] < 1
    # The joint residuals of TES and PCS partly cancel: narrower than the two half-widths added.
    assert total["interval"]["half_width"] < tes["interval"]["half_width"] + pcs["interval"]["half_width"]
    assert 7.5 < tes["interval"]["half_width"] <= 7.97 and 5.0 < pcs["interval"]["half_width"] <= 5.4
    # Effects of the total are the sums of the parts'.
    assert total["clips"][3]["effect"] == pytest.approx(tes["clips"][3]["effect"] + pcs["clips"][3]["effect"])
    assert sum(c["weight"] * c["score"] for c in total["clips"]) + sum(total["additive"].values()) == \
        pytest.approx(total["score"], abs=1e-3)

    permuted = tmp_path / "permuted.npy"
    features = np.load(fisv_video)
    np.save(permuted, features[:, np.random.default_rng(0).permutation(features.shape[1])])
    res = invoke_aqa("score", permuted, "--backbone", "vst", "--preset", "fisv-pcs", "--json", "--no-cache")
    row = json.loads(res.stdout)
    assert res.returncode == 0 and row["domain"]["in_domain"] is False and row["score"] is not None
    res = invoke_aqa("score", permuted, "--backbone", "vst", "--preset", "fisv-pcs", "--strict-domain", "--no-cache")
    assert res.returncode == 1 and "unlike" in res.stderr and "--strict-domain" in res.stderr


def test_the_demo_head_flags_videos_unlike_its_routines(i3d):
    """The demo head's domain model (its 120 training routines' I3D features): the sample routine is like them, the
    moving disc is not; --strict-domain makes the unlike one a failure."""
    res = invoke_aqa("score", "samples/routine_fall.mp4", "samples/moving_disc.mp4", "--preset", "demo", "--json")
    assert res.returncode == 0, res.stderr
    by_name = {Path(r["video"]).name: r for r in json.loads(res.stdout)}
    assert by_name["routine_fall.mp4"]["domain"]["in_domain"]
    assert not by_name["moving_disc.mp4"]["domain"]["in_domain"]
    strict = invoke_aqa("score", "samples/moving_disc.mp4", "--preset", "demo", "--strict-domain")
    assert strict.returncode == 1 and "moving_disc.mp4" in strict.stderr
