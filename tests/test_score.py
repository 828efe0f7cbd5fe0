"""`aqa score`: from a video (or a feature file) to a score with per-clip reasons.

The heads here are untrained (random weights): they test the plumbing (contracts,
cache, outputs, sums), not the scores' quality. They are built with I3D contracts
so that the real I3D backbone runs end to end on short videos.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from aqa_cli.cache import FeatureCache
from aqa_cli.errors import AqaError, FeatureError, WeightsError
from aqa_cli.extract import make_sidecar, video_features
from aqa_cli.fileio import sha256_file, write_json, write_npy
from aqa_cli.heads import create_head
from aqa_cli.heads.checkpoint import load_head, save_head
from aqa_cli.presets import load_preset
from aqa_cli.report import TOP_COLOUR, WEIGHT_COLOUR, material_effects, render_report, write_report
from aqa_cli.inputs import find_inputs
from aqa_cli.scoring import Scorer, choose_heads
from aqa_cli.synthetic import index_frames, moving_scene, write_video
from conftest import REPO, approx_across_instances, invoke_aqa

SAMPLE = REPO / "samples" / "moving_disc.mp4"
I3D_CONTRACT = {"backbone": "i3d", "feature_dim": 1024, "recipe": "i3d-deepmind"}


def make_head(path, head: str, *, contract=I3D_CONTRACT, cv: float | None = None, preset: str = "fisv-pcs",
              members: int = 1, seed: int = 0, extra: dict | None = None):
    """A small untrained head checkpoint with the metadata `aqa train` writes."""
    torch.manual_seed(seed)
    settings = load_preset("fisv-pcs").model_settings(head)
    heads = [create_head(head, settings).eval() for _ in range(members)]
    if head == "interp":
        # An untrained interp head's clip scores are an unbounded linear read, and a score off the scale is a
        # failed row: centre them in the scale, keeping some spread so that clips still differ.
        with torch.no_grad():
            for h in heads:
                h.score_mlp[-1].weight.mul_(0.3)
                h.score_mlp[-1].bias.fill_(0.5)
    meta = {"preset": preset, "target": "PCS", "scale": {"score_min": 0.0, "score_max": 40.0, "unit": "points"},
            "contract": contract, **(extra or {})}
    if cv is not None:
        meta["cv"] = {"folds": 5, "mean_spearman": cv}
    return save_head(path, heads, meta)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A stand-in for weights/: three fisv-pcs heads, interp with the best cross-validated ρ."""
    folder = tmp_path_factory.mktemp("shipped")
    make_head(folder / "fisv-pcs-gdlt.safetensors", "gdlt", cv=0.5, seed=1)
    make_head(folder / "fisv-pcs-interp.safetensors", "interp", cv=0.7, seed=2)
    make_head(folder / "fisv-pcs-cofinal.safetensors", "cofinal", seed=3, members=2)  # no CV: ranked last
    return folder


@pytest.fixture()
def env(shipped, monkeypatch):
    monkeypatch.setenv("AQA_WEIGHTS_DIR", str(shipped))
    monkeypatch.setenv("AQA_DEFAULT_PRESET", "fisv-pcs")  # the stand-in ships fisv-pcs heads only
    return {"AQA_WEIGHTS_DIR": str(shipped), "AQA_DEFAULT_PRESET": "fisv-pcs"}


@pytest.fixture(scope="module")
def short_video(tmp_path_factory):
    """2 clips of 32 frames at 25 fps (70 frames, the leftover trimmed)."""
    return write_video(tmp_path_factory.mktemp("short") / "short.mp4", moving_scene(70, 120, 160, seed=3), 25)


@pytest.fixture(scope="module")
def i3d_features(tmp_path_factory, i3d, short_video):
    """An I3D feature file of the short video, with its sidecar, as `aqa extract-features` writes it."""
    folder = tmp_path_factory.mktemp("features")
    result = video_features(short_video, i3d)
    sidecar = make_sidecar(result, short_video, video_sha256=sha256_file(short_video), predictions=None)
    write_npy(folder / "short.npy", result.features)
    write_json(folder / "short.json", sidecar)
    return folder / "short.npy"


def assert_sums_back(obj: dict) -> None:
    total = sum(c["weight"] * c["score"] for c in obj["clips"]) + sum(obj["additive"].values())
    assert total == pytest.approx(obj["score"], abs=1e-3)
    assert sum(c["weight"] for c in obj["clips"]) == pytest.approx(1.0, abs=1e-4)


def counting_factory(backbone):
    calls = []

    def factory(name):
        calls.append(name)
        return backbone

    return factory, calls


# ------------------------------------------------------------------------------------------ no backbone needed


def test_the_best_shipped_head_is_the_default(env):
    choice = choose_heads()
    assert choice.preset_name == "fisv-pcs" and [h.head for h in choice.heads] == ["interp"]
    assert [h.head for h in choose_heads(head="gdlt").heads] == ["gdlt"]
    assert [h.head for h in choose_heads(all_heads=True).heads] == ["interp", "gdlt", "cofinal"]
    with pytest.raises(AqaError, match="no cofinal head ships|unknown head") as exc:
        choose_heads(head="nope")
    assert "choose one of" in exc.value.message
    with pytest.raises(AqaError, match="no trained head ships for preset fisv-tes"):
        choose_heads(preset="fisv-tes")
    with pytest.raises(AqaError, match="unknown preset"):
        choose_heads(preset="curling")


def test_weights_option_takes_the_checkpoints_preset_and_refuses_another(env, shipped):
    path = shipped / "fisv-pcs-gdlt.safetensors"
    assert choose_heads(weights=path).preset_name == "fisv-pcs"
    with pytest.raises(AqaError, match="trained for fisv-pcs"):
        choose_heads(preset="fisv-tes", weights=path)
    with pytest.raises(AqaError, match="holds a gdlt head"):
        choose_heads(head="interp", weights=path)


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    res = invoke_aqa("score", SAMPLE, "--weights", bad)
    assert res.returncode == 2
    assert "bad.safetensors: not a readable safetensors file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    with pytest.raises(WeightsError, match="head checkpoint not found"):
        choose_heads(weights=tmp_path / "absent.safetensors")


def test_a_null_recipe_in_the_contract_means_the_backbones_default(tmp_path):
    head = load_head(make_head(tmp_path / "vst.safetensors", "gdlt",
                               contract={"backbone": "vst", "feature_dim": 1024, "recipe": None}))
    # No weights recorded (the first heads): the backbone's release weights.
    assert head.required_features() == {"backbone": "vst", "weights": "vst-k600", "feature_dim": 1024,
                                        "recipe": "gdlt"}
    assert head.check_weights("vst-k600", "x.npy") is None
    with pytest.raises(FeatureError, match="features made with the swin3d-b-k400 weights, but vst.safetensors was "
                                           "trained on vst-k600 features"):
        head.check_weights("swin3d-b-k400", "x.npy")
    assert "--trust-features" in head.check_weights("swin3d-b-k400", "x.npy", trust_features=True)
    head.check_contract("vst", "gdlt", "x.npy")
    with pytest.raises(FeatureError, match="follow the i3d-deepmind recipe but vst.safetensors was trained on the gdlt"):
        head.check_contract("vst", "i3d-deepmind", "x.npy")
    with pytest.raises(FeatureError, match="use --backbone vst"):
        head.check_contract("i3d", None, "x.npy")


def test_missing_backbone_weights_stop_with_the_fetch_command(env, tmp_path):
    video = write_video(tmp_path / "a.mp4", index_frames(40), 25)
    res = invoke_aqa("score", video, "--csv", tmp_path / "out.csv",
                     env={**env, "AQA_HOME": str(tmp_path / "home"), "AQA_OFFLINE": "1"})
    assert res.returncode == 2
    assert "aqa weights fetch i3d-kinetics400" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "Total" not in res.stdout and not (tmp_path / "out.csv").exists()


def test_a_demonstration_model_says_so_and_sidecarless_features_need_a_backbone(tmp_path):
    demo = make_head(tmp_path / "demo.safetensors", "gdlt", preset="",
                     extra={"demonstration": "demo head, trained on synthetic routines"})
    rng = np.random.default_rng(0)
    np.save(tmp_path / "bare.npy", rng.normal(size=(6, 1024)).astype(np.float32))
    res = invoke_aqa("score", tmp_path / "bare.npy", "--weights", demo)
    assert res.returncode == 1 and "has no sidecar bare.json" in res.stderr and "--backbone i3d" in res.stderr
    res = invoke_aqa("score", tmp_path / "bare.npy", "--weights", demo, "--backbone", "i3d")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "Note: demo head, trained on synthetic routines" in text
    assert "head demo (gdlt) · preset none" in text and "features from a feature file" in text
    assert "0:06.4–0:07.7" in text  # clip 5 of the recipe's 1.28 s clips
    obj = json.loads(invoke_aqa("score", tmp_path / "bare.npy", "--weights", demo, "--backbone", "i3d",
                                "--json").stdout)
    assert obj["demonstration"] == "demo head, trained on synthetic routines" and obj["preset"] is None
    assert len(obj["clips"]) == 6 and obj["warnings"] and "no sidecar" in obj["warnings"][0]
    assert_sums_back(obj)


def test_the_cache_returns_what_was_put_and_drops_damaged_entries(tmp_path):
    cache = FeatureCache(tmp_path)
    key = "ab" + "0" * 62
    feats = np.arange(8, dtype=np.float32).reshape(2, 4)
    # An entry as the scorer puts it: its recipe, its backbone and one time range per row (all checked on reading).
    sidecar = {"format": "aqa-features/1", "shape": [2, 4], "recipe": {"name": "r"}, "backbone": {"name": "b"},
               "clips": [{"start_s": 0.0, "end_s": 1.0}, {"start_s": 1.0, "end_s": 2.0}]}
    assert cache.get(key) is None
    cache.put(key, feats, sidecar)
    got, side = cache.get(key)
    assert np.array_equal(got, feats) and side["cache_key"] == key
    npy, js = cache.paths(key)
    npy.write_bytes(npy.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # 7.0 becomes 1.0: still a valid array
    assert cache.get(key) is None and not npy.exists() and not js.exists()
    cache.put(key, feats, sidecar)
    js.write_text(js.read_text().replace(key, "cd" + "0" * 62))  # an entry filed under another key
    assert cache.get(key) is None and not npy.exists()


def test_folders_are_taken_recursively_with_sidecars_and_hidden_files_left_out(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.mp4", "notes.txt", "sub/f.npy", "sub/f.json", "sub/other.json", ".hidden.mp4", "out.csv"):
        (tmp_path / name).write_bytes(b"x")
    found = find_inputs([tmp_path], features=True, exclude=[tmp_path / "out.csv"])
    assert [p.relative_to(tmp_path).as_posix() for p in found.paths] == ["a.mp4", "sub/f.npy"]
    assert [p.relative_to(tmp_path).as_posix() for p in found.skipped] == ["notes.txt", "sub/other.json"]


@pytest.mark.parametrize("native", [True, False])
def test_score_runs_at_auto_precision_by_default_and_extract_features_at_fp32(monkeypatch, native):
    """`aqa score` defaults to auto (bf16 where the CPU or GPU computes it natively), extract-features to fp32;
    the precision a scorer records (its cache key) is the one it runs at, whichever CPU runs this test."""
    import typer.main

    import aqa_cli.backbones
    from aqa_cli.cli import app

    commands = typer.main.get_command(app).commands
    default = {name: next(p.default for p in commands[name].params if p.name == "precision")
               for name in ("score", "extract-features")}
    assert default == {"score": "auto", "extract-features": "fp32"}
    monkeypatch.setattr(aqa_cli.backbones, "native_bf16", lambda device: native)
    scorer = Scorer(choose_heads(head="gdlt"), cache=None, device="cpu", precision=default["score"])
    assert scorer.precision_for("i3d") == scorer.precision_for("vst") == ("bf16" if native else "fp32")


# ------------------------------------------------------------------------------------------ the real I3D backbone


@pytest.mark.slow
def test_score_the_sample_end_to_end(env, i3d, tmp_path):
    out = tmp_path / "out"
    res = invoke_aqa("score", SAMPLE, "--csv", out / "scores.csv", "--clips-csv", out / "clips.csv",
                     "--plot", out / "timeline.png", env=env)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "fisv-pcs-interp" in text and "backbone i3d" in text and "reference scores at ρ 0.70" in text
    assert "/ 40 points" in text and "Total:" in text
    for row in ("0:00.0–0:01.3", "0:01.3–0:02.6", "0:05.1–0:06.4"):
        assert row in text
    assert "◆ " in text and "effect = the score minus the same head's score without that clip" in text
    # The head's own reasons are shown as reasons only where its explanation is faithful for this video.
    if "are faithful here" in text:
        assert "★ the heaviest weight" in text and "▼ the lowest clip score" in text
    else:
        assert "do NOT say what each clip does" in text and "★" not in text
    assert "Traceback" not in res.stderr

    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns[:3]) == ["path", "status", "score"] and len(scores) == 1
    row = scores.iloc[0]
    assert row["status"] == "ok" and row["head"] == "fisv-pcs-interp" and row["preset"] == "fisv-pcs"
    assert row["backbone"] == "i3d"
    assert pd.isna(row["error"]) and np.isfinite(row["score"])
    clips = pd.read_csv(out / "clips.csv")
    assert list(clips["clip"]) == [0, 1, 2, 3, 4]
    assert clips.contribution.sum() == pytest.approx(row["score"], abs=1e-3)
    assert clips.start_s.iloc[1] == pytest.approx(1.28) and clips.end_s.iloc[4] == pytest.approx(6.4)

    from PIL import Image

    with Image.open(out / "timeline.png") as im:
        assert im.format == "PNG" and im.size[0] >= 800
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas

    # Again as JSON, another run: the features come from the cache (the same bytes) and the score is the
    # same within the cross-instance tolerance (another head instance).
    res = invoke_aqa("score", SAMPLE, "--json", env=env)
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    assert {"video", "preset", "head", "backbone", "score", "scale", "clips", "extras"} <= set(obj)
    assert obj["features_source"] == "cache" and obj["score"] == approx_across_instances(row["score"])
    assert obj["scale"] == {"min": 0.0, "max": 40.0, "unit": "points"}
    assert [c["index"] for c in obj["clips"]] == [0, 1, 2, 3, 4]
    assert_sums_back(obj)


@pytest.mark.slow
def test_all_heads_agree_or_not_and_every_head_sums_back(env, i3d):
    res = invoke_aqa("score", SAMPLE, "--all-heads", "--json", env=env)
    assert res.returncode == 0, res.stderr
    objs = json.loads(res.stdout)
    assert [o["head_family"] for o in objs] == ["interp", "gdlt", "cofinal"]
    assert [o["head"] for o in objs] == ["fisv-pcs-interp", "fisv-pcs-gdlt", "fisv-pcs-cofinal"]
    for o in objs:
        assert_sums_back(o)
    cofinal = objs[2]
    assert set(cofinal["additive"]) == {"fine"} and len(cofinal["extras"]["member_scores"]) == 2
    assert sum(g["prob"] for g in cofinal["extras"]["grades"]) == pytest.approx(1.0, abs=1e-5)
    res = invoke_aqa("score", SAMPLE, "--all-heads", env=env)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "agreement between heads" in text and re.search(r"│ \d+\.\d\d \(\d+%\) │ (yes|no) │", text)


@pytest.mark.slow
def test_another_head_reuses_the_cached_features_without_the_backbone(env, i3d, short_video, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    factory, calls = counting_factory(i3d)
    first = Scorer(choose_heads(head="gdlt"), cache=cache, backbone_factory=factory, device="cpu")
    [a] = first.score(short_video)
    assert a.ok and a.features_source == "backbone" and len(a.clips) == 2
    assert first.stats["backbone_runs"] == 1 and calls == ["i3d"]

    factory, calls = counting_factory(i3d)
    second = Scorer(choose_heads(head="interp"), cache=cache, backbone_factory=factory, device="cpu")
    [b] = second.score(short_video)
    assert b.ok and b.features_source == "cache" and b.head == "interp"
    assert calls == [] and second.stats == {"backbone_runs": 0, "cache_hits": 1, "backbones_built": 0}

    # Determinism: the backbone run again (no cache) gives the same score; the head is loaded again, another
    # instance, so within the cross-instance tolerance.
    [c] = Scorer(choose_heads(head="gdlt"), cache=None, backbone_factory=factory, device="cpu").score(short_video)
    assert c.features_source == "backbone" and c.score == approx_across_instances(a.score)

    # A damaged entry is recomputed, not trusted, and comes back intact.
    [entry] = list((tmp_path / "cache").rglob("*.npy"))
    data = bytearray(entry.read_bytes())
    data[-8:] = b"\x7f" * 8
    entry.write_bytes(bytes(data))
    third = Scorer(choose_heads(head="gdlt"), cache=cache, backbone_factory=factory, device="cpu")
    [d] = third.score(short_video)
    assert third.stats["backbone_runs"] == 1 and d.features_source == "backbone" and d.score == approx_across_instances(a.score)
    [e] = Scorer(choose_heads(head="gdlt"), cache=cache, backbone_factory=factory, device="cpu").score(short_video)
    assert e.features_source == "cache" and e.score == approx_across_instances(a.score)


@pytest.mark.slow
def test_a_folder_with_bad_files_gives_error_rows_and_a_nonzero_exit(env, i3d, short_video, tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(short_video, folder / "good.mp4")
    whole = write_video(tmp_path / "whole.mp4", moving_scene(90, 120, 160, seed=5), 25).read_bytes()
    (folder / "corrupt.mp4").write_bytes(whole[: len(whole) // 3])
    (folder / "notes.txt").write_text("not a video\n")
    (folder / "notes.mp4").write_text("not a video either\n")
    res = invoke_aqa("score", folder, "--csv", tmp_path / "scores.csv", "--clips-csv", tmp_path / "clips.csv", env=env)
    assert res.returncode == 1
    assert "Traceback" not in res.stdout + res.stderr
    assert "2 of 3 input(s) failed" in res.stderr and "skipped 1 file that is not a video (.txt)" in res.stderr
    rows = pd.read_csv(tmp_path / "scores.csv").set_index("path")
    assert len(rows) == 3
    good, corrupt, notes = (rows.loc[str(folder / n)] for n in ("good.mp4", "corrupt.mp4", "notes.mp4"))
    assert good.status == "ok" and np.isfinite(good.score) and pd.isna(good.error)
    assert corrupt.status == "failed" and pd.isna(corrupt.score)
    assert "corrupt.mp4: not a readable video" in corrupt.error
    assert notes.status == "failed" and "notes.mp4: not a readable video" in notes.error
    assert set(pd.read_csv(tmp_path / "clips.csv").path) == {str(folder / "good.mp4")}


@pytest.mark.slow
def test_vst_trained_heads_refuse_i3d_features(env, i3d, i3d_features, short_video, tmp_path):
    vst_head = make_head(tmp_path / "vst-head.safetensors", "gdlt",
                         contract={"backbone": "vst", "feature_dim": 1024, "recipe": None})
    res = invoke_aqa("score", i3d_features, "--weights", vst_head, "--csv", tmp_path / "s.csv", env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert ("short.npy: features come from the i3d backbone but vst-head.safetensors was trained on vst features"
            in " ".join(res.stderr.split()))
    assert "--backbone vst" in res.stderr
    assert pd.read_csv(tmp_path / "s.csv").status.tolist() == ["failed"]
    # Asking for the wrong backbone outright is refused before anything runs.
    res = invoke_aqa("score", short_video, "--weights", vst_head, "--backbone", "i3d", env=env)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--backbone i3d, but vst-head.safetensors was trained on vst features" in res.stderr
    # Another recipe's features are refused too.
    other = make_head(tmp_path / "recipe.safetensors", "gdlt", contract={**I3D_CONTRACT, "recipe": "gdlt"})
    [r] = Scorer(choose_heads(weights=other), device="cpu").score(i3d_features)
    assert not r.ok and "follow the i3d-deepmind recipe" in r.error


@pytest.mark.slow
def test_feature_files_score_like_their_video(env, i3d, i3d_features, short_video, tmp_path):
    factory, calls = counting_factory(i3d)
    scorer = Scorer(choose_heads(head="gdlt"), cache=None, backbone_factory=factory, device="cpu")
    from_file, from_video = scorer.score(i3d_features)[0], scorer.score(short_video)[0]
    assert from_file.features_source == "file" and from_file.video == short_video
    assert from_file.score == approx_across_instances(from_video.score)
    assert [(c.start_s, c.end_s) for c in from_file.clips] == [(c.start_s, c.end_s) for c in from_video.clips]
    assert calls == ["i3d"]  # only the video needed the backbone

    # Without its video, the report says so instead of showing frames.
    moved = tmp_path / "moved"
    moved.mkdir()
    side = json.loads(i3d_features.with_suffix(".json").read_text())
    side["video"] = str(tmp_path / "gone.mp4")
    write_json(moved / "short.json", side)
    shutil.copy(i3d_features, moved / "short.npy")
    [r] = scorer.score(moved / "short.npy")
    assert r.ok and r.video is None
    page = render_report([r])
    assert "not reachable" in page and 'class="thumb"' not in page and 'class="timeline"' in page


@pytest.mark.slow
def test_bad_inputs_fail_one_by_one_with_the_file_named(env, i3d, i3d_features, tmp_path):
    side = json.loads(i3d_features.with_suffix(".json").read_text())
    nan = np.load(i3d_features)
    nan[1, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    write_json(tmp_path / "nan.json", side)
    np.save(tmp_path / "narrow.npy", np.zeros((2, 512), np.float32))
    write_json(tmp_path / "narrow.json", {**side, "shape": [2, 512]})
    np.save(tmp_path / "bare.npy", np.zeros((2, 1024), np.float32))
    write_video(tmp_path / "ten.mp4", index_frames(10), 25)
    (tmp_path / "empty.mp4").write_bytes(b"")
    factory, _ = counting_factory(i3d)
    scorer = Scorer(choose_heads(head="gdlt"), cache=None, backbone_factory=factory, device="cpu")
    errors = {p.name: scorer.score(p)[0].error for p in sorted(tmp_path.iterdir()) if p.suffix != ".json"}
    assert "nan.npy: 1 clip(s) contain NaN or inf" in errors["nan.npy"]
    assert "narrow.npy: features are 512-d but fisv-pcs-gdlt.safetensors expects 1024-d" in errors["narrow.npy"]
    assert "bare.npy: has no sidecar bare.json" in errors["bare.npy"] and "--backbone i3d" in errors["bare.npy"]
    assert "ten.mp4: only 10 frames at 25 fps, shorter than one 32-frame clip" in errors["ten.mp4"]
    assert "empty.mp4: the file is empty (0 bytes)" in errors["empty.mp4"]
    assert all("\n" not in e for e in errors.values())
    # The user may vouch for sidecar-less features: times then follow the recipe.
    vouched = Scorer(choose_heads(head="gdlt"), backbone="i3d", cache=None, device="cpu").score(tmp_path / "bare.npy")[0]
    assert vouched.ok and [c.end_s for c in vouched.clips] == [pytest.approx(1.28), pytest.approx(2.56)]


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _browse(browser: str, page, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args, page.as_uri()], capture_output=True, text=True,
                          timeout=120)


def _colour_pixels(png, colour: str) -> int:
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    want = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).sum(axis=-1) <= 6).sum())


@pytest.mark.slow
def test_the_html_report_renders_in_a_real_browser(env, i3d, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium: install it with `apt-get install -y chromium` (as .ci/run does)")
    factory, _ = counting_factory(i3d)
    results = Scorer(choose_heads(), cache=FeatureCache(), backbone_factory=factory, device="cpu").score(SAMPLE)
    page = write_report(tmp_path / "report.html", results)
    text = page.read_text()
    assert not re.search(r'(src|href)="(?!data:)|url\(', text)  # self-contained: nothing fetched from elsewhere

    dom = _browse(browser, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>aqa score report: moving_disc.mp4</title>" in dom.stdout
    assert "<h1>moving_disc.mp4</h1>" in dom.stdout
    timeline = [tag for tag in dom.stdout.split("<img")[1:] if 'class="timeline"' in tag]
    assert len(timeline) == 1 and 'data-rendered="yes"' in timeline[0]
    # Frames of the clips whose effect is material (none, on some heads: the page then says so).
    thumbs = [tag for tag in dom.stdout.split("<img")[1:] if 'class="thumb"' in tag]
    assert len(thumbs) == len(material_effects(results[0])) and all('data-rendered="yes"' in t for t in thumbs)
    assert thumbs or "No single clip stands out" in dom.stdout

    shot = tmp_path / "shot.png"
    res = _browse(browser, page, f"--screenshot={shot}", "--window-size=1200,1600")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    # The timeline's bars are drawn in two solid colours that nothing else on the page uses.
    assert _colour_pixels(shot, WEIGHT_COLOUR) + _colour_pixels(shot, TOP_COLOUR) > 2000

    # The same checks fail on a page whose timeline image is broken.
    start = text.index('class="timeline"')
    src = text.index("base64,", start) + len("base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(text[:src] + "AAAA" + text[src + 4000:])
    dom = _browse(browser, broken, "--dump-dom")
    timeline = [tag for tag in dom.stdout.split("<img")[1:] if 'class="timeline"' in tag]
    assert 'data-rendered="no"' in timeline[0]
    _browse(browser, broken, f"--screenshot={shot}", "--window-size=1200,1600")
    assert _colour_pixels(shot, WEIGHT_COLOUR) + _colour_pixels(shot, TOP_COLOUR) < 50
