"""Hostile and broken inputs (issue 22): every one gets a one-line refusal (exit 2), a failed row while the batch
goes on (exit 1), or is recomputed; never a traceback, a write through a planted link, a read outside what was
given, or a score outside its preset's scale.

Everything here runs on feature files (.npy + sidecar) scored by the shipped demo head, on tiny synthetic videos,
and on a stand-in backbone (a few lines of torch): no real backbone is built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aqa_cli.backbones import Backbone, get_backbone_spec
from aqa_cli.cache import FeatureCache
from aqa_cli.errors import AqaError, WeightsError
from aqa_cli.extract import FEATURES_FORMAT, extract_to_folder
from aqa_cli.fileio import HOST_TAG, TMP_MARK, write_json, write_npy, write_text
from aqa_cli.heads.checkpoint import load_head, shipped_dir
from aqa_cli.presets import load_preset
from aqa_cli.scoring import Scorer, choose_heads
from aqa_cli.synthetic import moving_scene, write_video
from aqa_cli.video import open_video
from aqa_cli.weights import read_safetensors, save_safetensors
from conftest import REPO, invoke_aqa

DEMO_HEAD = shipped_dir() / "demo-interp.safetensors"
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
needs_non_root = pytest.mark.skipif(ROOT, reason="root writes into read-only folders: the refusal cannot happen")


def sidecar(n: int = 5, dim: int = 1024, **over) -> dict:
    """A feature sidecar as extract-features writes it, for I3D features (the demo head's contract)."""
    data = {"format": FEATURES_FORMAT, "shape": [n, dim], "dtype": "float32", "backbone": {"name": "i3d"},
            "recipe": {"name": "i3d-deepmind"}, "source": {"warnings": []},
            "clips": [{"index": i, "start_s": i * 1.28, "end_s": (i + 1) * 1.28} for i in range(n)]}
    data.update(over)
    return data


def good_features(n: int = 5, seed: int = 0) -> np.ndarray:
    # Non-negative and small, as I3D's pooled features are; the demo head scores them inside 0–10.
    return np.abs(np.random.default_rng(seed).normal(0, 0.5, (n, 1024))).astype(np.float32)


def write_pair(folder: Path, stem: str, array: np.ndarray | None = None, side: dict | None = None) -> Path:
    npy = folder / f"{stem}.npy"
    np.save(npy, good_features() if array is None else array, allow_pickle=False)
    (folder / f"{stem}.json").write_text(json.dumps(sidecar() if side is None else side))
    return npy


def assert_one_line_refusal(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)


# ------------------------------------------------------------------------------------------------ 1. option ranges


@pytest.mark.parametrize("args", [
    ["--clip-len", "100000000"], ["--clip-len", "99999999999999999999999"], ["--stride", "10000000000000"],
    ["--batch-size", "1000000000"], ["--clip-len", "512", "--batch-size", "64"], ["--decode-workers", "100000"],
])
def test_numeric_extract_options_out_of_range_are_refused_before_any_work(tmp_path, args):
    res = invoke_aqa("extract-features", REPO / "samples" / "moving_disc.mp4", "--out", tmp_path / "o", *args,
                     env={"AQA_HOME": tmp_path / "home", "AQA_OFFLINE": "1"})
    assert_one_line_refusal(res, "out of range" if "64" not in args else "frames in one forward pass")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--top", "99999999999999999999999"], ["--batch-size", "5000"]])
def test_numeric_score_options_out_of_range_are_refused(tmp_path, args):
    npy = write_pair(tmp_path, "a")
    assert_one_line_refusal(invoke_aqa("score", npy, "--preset", "demo", *args), "out of range")


def test_numeric_train_options_out_of_range_are_refused(tmp_path):
    res = invoke_aqa("train", "--features", tmp_path, "--labels", tmp_path / "l.csv", "--target", "x", "--head", "gdlt",
                     "--out", tmp_path / "h.safetensors", "--epochs", "10000000000")
    assert_one_line_refusal(res, "--epochs", "out of range")


# ------------------------------------------------------------------------------------------------ 2, 11. feature files

BAD_ARRAYS = {
    "strings": np.array([["a"] * 1024] * 5),
    "structured": np.zeros(5, dtype=[("x", "f4"), ("y", "i4")]),
    "int32": (good_features() * 100).astype(np.int32),
    "bool": good_features() > 0.3,
    "complex": good_features().astype(np.complex64),
    "float64": good_features().astype(np.float64),  # the sidecar says float32
    "huge": np.full((5, 1024), 1e38, dtype=np.float32),
    "nan": np.full((5, 1024), np.nan, dtype=np.float32),
    "three_d": good_features().reshape(5, 32, 32),
    "short": good_features(4),  # the sidecar says 5 clips
}


def _clips_without_start() -> dict:
    side = sidecar()
    del side["clips"][2]["start_s"]
    return side


BAD_SIDECARS = {
    "clips_without_start": _clips_without_start(),
    "recipe_string": sidecar(recipe="i3d-deepmind"),
    "backbone_string": sidecar(backbone="i3d"),
    "shape_null": sidecar(shape=None),
    "video_int": sidecar(video=7),
    "warnings_string": sidecar(source={"warnings": "abc"}),
    "clips_dict": sidecar(clips={"0": {}}),
    "dtype_int": sidecar(dtype="int32"),
    "frames_file_path": sidecar(frames_file="../../etc/passwd"),
    "not_json_object": [1, 2, 3],
}


def test_bad_feature_files_are_failed_rows_and_the_batch_goes_on(tmp_path):
    good = write_pair(tmp_path, "0good")
    for stem, array in BAD_ARRAYS.items():
        write_pair(tmp_path, stem, array)
    for stem, side in BAD_SIDECARS.items():
        npy = write_pair(tmp_path, stem)
        npy.with_suffix(".json").write_text(json.dumps(side))
    with open(tmp_path / "npz_archive.npy", "wb") as fh:  # an .npz archive under a .npy name
        np.savez(fh, x=good_features())
    (tmp_path / "npz_archive.json").write_text(json.dumps(sidecar()))
    csv = tmp_path / "out" / "scores.csv"

    res = invoke_aqa("score", tmp_path, "--preset", "demo", "--csv", csv)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    table = pd.read_csv(csv)
    ok = table[table.status == "ok"]
    assert list(ok.path) == [str(good)] and 0.0 <= ok.score.iloc[0] <= 10.0
    failed = table[table.status == "failed"]
    assert len(failed) == len(BAD_ARRAYS) + len(BAD_SIDECARS) + 1
    assert all(Path(p).stem in e for p, e in zip(failed.path, failed.error))
    assert str(table.clips.dtype) == "int64" or table.clips.dropna().map(float.is_integer).all()
    assert "5," in csv.read_text().splitlines()[1] or ",5," in csv.read_text()  # 5, not 5.0
    errors = dict(zip(failed.path.map(lambda p: Path(p).stem), failed.error))
    assert "not floating-point" in errors["int32"] and "not floating-point" in errors["complex"]
    assert "float64 values but its sidecar says float32" in errors["float64"]
    assert "far beyond any backbone's features" in errors["huge"] and "checkpoint" not in errors["huge"]
    assert "source.warnings is not a list" in errors["warnings_string"]


def test_a_warnings_string_is_never_spelled_out_character_by_character(tmp_path):
    npy = write_pair(tmp_path, "w", side=sidecar(source={"warnings": "variable frame rate"}))
    res = invoke_aqa("score", npy, "--preset", "demo")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "warning v" not in res.stderr.lower() and "source.warnings is not a list of texts" in res.stderr


# ------------------------------------------------------------------------------------------------ 3, 12. head files


def _head_variant(tmp_path: Path, *, meta: dict | None = None, tensor=None) -> Path:
    tensors, metadata = read_safetensors(DEMO_HEAD)
    metadata.update(meta or {})
    if tensor is not None:
        tensors = {k: tensor(v) if v.is_floating_point() else v for k, v in tensors.items()}
    out = tmp_path / "head.safetensors"
    save_safetensors(tensors, out, metadata)
    return out


@pytest.mark.parametrize("meta,words", [
    ({"config": "[1, 2]"}, "config"), ({"config": "nonsense"}, "config"), ({"members": "0"}, "members"),
    ({"members": "-3"}, "members"), ({"members": "99999999999"}, "members"), ({"contract": "[]"}, "contract"),
    ({"contract": json.dumps({"backbone": 3})}, "contract"), ({"contract": json.dumps({"feature_dim": "x"})}, "feature_dim"),
    ({"scale": "\"0-10\""}, "scale"), ({"scale": json.dumps({"score_min": "a"})}, "score_min"),
    ({"scale": json.dumps({"score_min": 10, "score_max": 0})}, "minimum must be below"),
    ({"head": "nohead"}, "unknown head"), ({"preset": "../../../etc/x"}, "not a preset name"),
    ({"cv": "[1]"}, "cv"),
])
def test_head_files_with_wrong_metadata_are_refused(tmp_path, meta, words):
    head = _head_variant(tmp_path, meta=meta)
    res = invoke_aqa("score", write_pair(tmp_path, "a"), "--weights", head)
    assert_one_line_refusal(res, str(head), words)


@pytest.mark.parametrize("tensor,words", [
    (lambda t: t.bool(), "bool"), (lambda t: (t * 100).int(), "int32"), (lambda t: t.to(torch.complex64), "complex"),
    (lambda t: t.float().fill_(float("nan")), "NaN"),
])
def test_head_tensors_of_the_wrong_dtype_are_refused(tmp_path, tensor, words):
    head = _head_variant(tmp_path, tensor=tensor)
    res = invoke_aqa("score", write_pair(tmp_path, "a"), "--weights", head)
    assert_one_line_refusal(res, str(head), words)


def test_a_score_outside_the_scale_is_never_shown_as_a_score(tmp_path):
    # The demo head scores about 8 on 0–10; recorded with a scale of 0–1 its scores are outside it.
    head = _head_variant(tmp_path, meta={"scale": json.dumps({"score_min": 0.0, "score_max": 1.0})})
    res = invoke_aqa("score", write_pair(tmp_path, "a"), "--weights", head, "--json")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    row = json.loads(res.stdout)
    assert row["status"] == "failed" and "outside its scale 0–1" in row["error"] and "score" not in row


# ------------------------------------------------------------------------------------------------ 4. output paths


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    npy = write_pair(tmp_path, "a")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    video = REPO / "samples" / "moving_disc.mp4"
    offline = {"AQA_HOME": tmp_path / "home", "AQA_OFFLINE": "1"}  # a backbone built first would fail on weights
    assert_one_line_refusal(invoke_aqa("score", npy, "--preset", "demo", "--csv", tmp_path / "folder"),
                            "--csv names a folder")
    assert_one_line_refusal(invoke_aqa("score", video, "--preset", "demo", "--report", tmp_path / "file" / "r.html",
                                       env=offline), "is a file, not a folder")
    assert_one_line_refusal(invoke_aqa("score", npy, "--preset", "demo", "--csv", tmp_path / "s.csv",
                                       "--clips-csv", tmp_path / "s.csv"), "--csv and --clips-csv name the same file")
    assert_one_line_refusal(invoke_aqa("extract-features", video, "--out", tmp_path / "file", env=offline),
                            "--out names an existing file")
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "home" / "weights").exists()


@needs_non_root
def test_read_only_output_folders_are_refused_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    offline = {"AQA_HOME": tmp_path / "home", "AQA_OFFLINE": "1"}
    video = REPO / "samples" / "moving_disc.mp4"
    try:
        for option in ("--csv", "--report", "--plot"):
            assert_one_line_refusal(invoke_aqa("score", video, "--preset", "demo", option, ro / "x", env=offline),
                                    "not writable")
        assert_one_line_refusal(invoke_aqa("extract-features", video, "--out", ro, env=offline), "not writable")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------------ 5, 6. the weights cache


def test_an_unusable_aqa_home_is_one_line_with_the_fetch_command(tmp_path):
    (tmp_path / "file").write_text("x")
    res = invoke_aqa("score", REPO / "samples" / "moving_disc.mp4", "--preset", "demo",
                     env={"AQA_HOME": tmp_path / "file" / "home"})
    assert_one_line_refusal(res, "cannot be written", "aqa weights fetch", "AQA_HOME")


@pytest.mark.parametrize("payload", [struct.pack("<Q", 10**15) + b"{}", struct.pack("<Q", 5) + b"{nope", b"\0" * 3])
def test_malformed_safetensors_as_backbone_weights_are_refused(tmp_path, payload):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)
    res = invoke_aqa("extract-features", REPO / "samples" / "moving_disc.mp4", "--out", tmp_path / "o",
                     "--weights", bad, env={"AQA_HOME": tmp_path / "home"})
    assert_one_line_refusal(res, str(bad))


# ------------------------------------------------------------------------------------------------ 7. the feature cache


def test_a_cache_entry_damaged_in_meaning_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path)
    key = "ab" * 32
    cache.put(key, good_features(), sidecar())
    npy, js = cache.paths(key)
    for damage in ({"backbone": "i3d"}, {"recipe": None}, {"clips": "x"}, {"shape": None}):
        cache.put(key, good_features(), sidecar())
        entry = json.loads(js.read_text())
        entry.update(damage)
        js.write_text(json.dumps(entry))
        assert cache.get(key) is None, damage
        assert not js.exists() and not npy.exists()


# ------------------------------------------------------------------------------------------------ 8. narrow videos


@pytest.mark.parametrize("height,width", [(16, 16), (24, 24), (16, 32)])
def test_narrow_videos_are_read_by_pyav_when_decord_cannot(tmp_path, height, width):
    video = write_video(tmp_path / "narrow.mp4", moving_scene(12, height, width, seed=1), 25)
    with open_video(video) as reader:
        frames = np.concatenate([f for _, f in reader.iter_chunks(range(12))])
    assert frames.shape == (12, height, width, 3)


# ------------------------------------------------------------------------------------------------ 10. resume


class _TinyModel(torch.nn.Module):
    """A stand-in backbone: the mean colour of each clip, repeated (features depend on the video)."""

    def forward(self, x: torch.Tensor) -> SimpleNamespace:  # x [B, 3, T, H, W]
        return SimpleNamespace(features=x.float().mean(dim=(2, 3, 4)).repeat(1, 4), logits=None)


@pytest.fixture()
def tiny_backbone() -> Backbone:
    spec = get_backbone_spec("i3d")
    spec = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, clip_len=4, stride=4), feature_dim=12)
    return Backbone(spec, _TinyModel(), weights_sha256="0" * 64, class_names=None, device=torch.device("cpu"),
                    precision="fp32")


def test_resume_never_takes_another_videos_features(tmp_path, tiny_backbone):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    a = write_video(tmp_path / "a" / "clip.mp4", moving_scene(12, 48, 64, seed=1), 25)
    b = write_video(tmp_path / "b" / "clip.mp4", moving_scene(12, 48, 64, seed=2), 25)
    out = tmp_path / "o"
    assert [o.status for o in extract_to_folder([a], tiny_backbone, out)] == ["extracted"]
    assert [o.status for o in extract_to_folder([a], tiny_backbone, out)] == ["skipped"]
    (outcome,) = extract_to_folder([b], tiny_backbone, out)
    assert outcome.status == "failed" and "features of another video" in outcome.error and "--overwrite" in outcome.error
    assert json.loads((out / "clip.json").read_text())["video"] == str(a)
    (outcome,) = extract_to_folder([b], tiny_backbone, out, overwrite=True)
    assert outcome.status == "extracted" and json.loads((out / "clip.json").read_text())["video"] == str(b)
    # A copy of the same bytes elsewhere is the same video: its hash says so.
    copy = tmp_path / "c" / "clip.mp4"
    copy.parent.mkdir()
    copy.write_bytes(b.read_bytes())
    assert [o.status for o in extract_to_folder([copy], tiny_backbone, out)] == ["skipped"]


@pytest.mark.parametrize("damage", [{"backbone": "i3d"}, {"recipe": "i3d-deepmind"}, {"shape": None},
                                    {"clips": [{"index": 0}]}, {"video": 3}, "not json"])
def test_damaged_outputs_are_redone_on_resume(tmp_path, tiny_backbone, damage):
    video = write_video(tmp_path / "v.mp4", moving_scene(12, 48, 64, seed=1), 25)
    out = tmp_path / "o"
    extract_to_folder([video], tiny_backbone, out)
    js = out / "v.json"
    if isinstance(damage, dict):
        js.write_text(json.dumps({**json.loads(js.read_text()), **damage}))
    else:
        js.write_text(damage)
    (outcome,) = extract_to_folder([video], tiny_backbone, out)
    assert outcome.status == "extracted", outcome.error
    assert json.loads(js.read_text())["backbone"]["name"] == "i3d"


# ------------------------------------------------------------------------------------------------ 13. planted links


def test_writes_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    # Every name the old writer used for this process, and a link at the target itself.
    for name in ("s.csv", "r.html"):
        (out / f"{TMP_MARK}{os.getpid()}.{HOST_TAG}-{name}").symlink_to(victim)
    (out / "r.html").symlink_to(victim)
    npy = write_pair(tmp_path, "a")
    res = invoke_aqa("score", npy, "--preset", "demo", "--csv", out / "s.csv", "--report", out / "r.html")
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "precious"
    assert not (out / "r.html").is_symlink() and "<html" in (out / "r.html").read_text()
    assert "ok" in (out / "s.csv").read_text()


def test_stale_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f"{TMP_MARK}{pid}.{HOST_TAG}-s.csv"
    stale.write_bytes(b"")
    alive = tmp_path / f"{TMP_MARK}{os.getpid()}.{HOST_TAG}-x-t.csv"  # a live writer's (ours) is kept
    alive.write_bytes(b"")
    write_text(tmp_path / "s.csv", "a\n")
    assert not stale.exists() and alive.exists()
    assert (tmp_path / "s.csv").read_text() == "a\n"
    assert oct((tmp_path / "s.csv").stat().st_mode & 0o777) != oct(0o600)  # an ordinary file's permissions


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        write_json(target, {"a": float("nan")})  # allow_nan=False: refused while serialising
    with pytest.raises(ZeroDivisionError):
        from aqa_cli.fileio import atomic_write

        atomic_write(target, lambda fh: (fh.write(b"half"), 1 / 0))
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ------------------------------------------------------------------------------------------------ 14-16. names, videos


@pytest.mark.parametrize("preset", ["../../../etc/x", "/etc/x", "demo/../demo", "DEMO"])
def test_presets_are_names_never_paths(tmp_path, preset):
    (tmp_path / "x.toml").write_text('name = "x"\n')
    res = invoke_aqa("score", write_pair(tmp_path, "a"), "--preset", preset)
    assert_one_line_refusal(res, "preset")
    with pytest.raises(AqaError):
        load_preset(str(tmp_path / "x"))


def test_a_sidecar_without_a_video_hash_shows_no_frames(tmp_path):
    npy = write_pair(tmp_path, "a", side=sidecar(video="/etc/passwd"))
    report = tmp_path / "r.html"
    res = invoke_aqa("score", npy, "--preset", "demo", "--report", report)
    assert res.returncode == 0, res.stderr
    page = report.read_text()
    assert "cannot be verified" in page and "class=\"thumb\"" not in page and "root:" not in page


def test_a_relative_video_path_is_taken_from_the_sidecars_folder(tmp_path):
    from aqa_cli.fileio import sha256_file

    folder = tmp_path / "features"
    (folder / "clips").mkdir(parents=True)
    video = write_video(folder / "clips" / "v.mp4", moving_scene(8, 32, 32, seed=1), 25)
    npy = write_pair(folder, "a", side=sidecar(video="clips/v.mp4", video_sha256=sha256_file(video)))
    (result,) = Scorer(choose_heads("demo")).score(npy)  # the test runs from another folder than `folder`
    assert Path.cwd() != folder and result.ok and result.video == folder / "clips" / "v.mp4"
    # The same path with other bytes is not the video.
    video.write_bytes(b"other")
    (result,) = Scorer(choose_heads("demo")).score(npy)
    assert result.ok and result.video is None


# ------------------------------------------------------------------------------------------------ properties

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
_SIDECAR_KEYS = ["format", "shape", "dtype", "backbone", "recipe", "source", "timeline", "clips", "video",
                 "video_sha256", "frames_file", "predictions", "warnings"]


@st.composite
def _damaged_sidecars(draw) -> dict:
    side = sidecar()
    for key in draw(st.lists(st.sampled_from(_SIDECAR_KEYS), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()):
            side.pop(key, None)
        else:
            side[key] = draw(_JSON)
    return side


_ARRAYS = hnp.arrays(dtype=st.sampled_from([np.float32, np.float16, np.float64, np.int8, np.uint16, np.bool_,
                                            np.complex64, np.dtype("U2"), np.dtype([("a", "f4")])]),
                     shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(array=_ARRAYS | st.just(good_features()), side=_damaged_sidecars() | st.just(sidecar()))
def test_property_malformed_feature_files_never_escape_the_error_handler(tmp_path_factory, array, side):
    folder = tmp_path_factory.mktemp("prop")
    npy = write_pair(folder, "x", array, side)
    res = invoke_aqa("score", npy, "--preset", "demo", "--json")
    assert res.returncode in (0, 1), res.stderr
    assert "Traceback" not in res.stderr
    row = json.loads(res.stdout)
    if row["status"] == "ok":
        assert 0.0 <= row["score"] <= 10.0


_HEAD_KEYS = ["config", "members", "contract", "scale", "preset", "head", "cv", "faithfulness", "demonstration",
              "target"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.dictionaries(st.sampled_from(_HEAD_KEYS), _JSON.map(json.dumps) | st.text(max_size=12),
                               min_size=1, max_size=3))
def test_property_malformed_head_metadata_never_escapes_the_error_handler(tmp_path_factory, changes):
    folder = tmp_path_factory.mktemp("head")
    head = _head_variant(folder, meta=changes)
    try:
        load_head(head)
    except WeightsError:
        pass
    res = invoke_aqa("score", write_pair(folder, "a"), "--weights", head, "--json")
    assert res.returncode in (0, 1, 2), res.stderr
    assert "Traceback" not in res.stderr
    if res.returncode in (0, 1):
        row = json.loads(res.stdout)
        if row["status"] == "ok":
            assert row["scale"]["min"] <= row["score"] <= row["scale"]["max"]


# ------------------------------------------------------------------------------- a long video and a costly head


def test_a_long_video_skips_the_interp_heads_measured_effects_saying_so(tmp_path):
    """Measured effects cost T passes of T - 1 clips (T^3 for interp): over MAX_MEASURED_CLIPS they are skipped
    by default, with a warning naming --effects always; the score itself is unchanged."""
    from aqa_cli.scoring import MAX_MEASURED_CLIPS

    n = MAX_MEASURED_CLIPS + 1
    npy = write_pair(tmp_path, "long", good_features(n), sidecar(n))
    res = invoke_aqa("score", npy, "--preset", "demo", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert all(c["effect"] is None for c in out["clips"]) and out["faithfulness"] is None
    assert any("--effects always" in w for w in out["warnings"])
    short = write_pair(tmp_path, "short", good_features(n)[:40], sidecar(40))
    for mode, measured in (("auto", True), ("never", False)):
        res = invoke_aqa("score", short, "--preset", "demo", "--json", "--effects", mode)
        assert res.returncode == 0, res.stderr
        assert (json.loads(res.stdout)["clips"][0]["effect"] is not None) == measured
    assert_one_line_refusal(invoke_aqa("score", short, "--preset", "demo", "--effects", "sometimes"), "--effects")
