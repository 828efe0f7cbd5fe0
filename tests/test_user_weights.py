"""Backbone checkpoints given by path (`--weights FILE`, `aqa score --backbone-weights FILE`).

A Video Swin that is not the release (another size, another class count) in the official mmcv layout is
built from the official module definitions in tests/test_vst.py (key names, shapes, the official
relative-position index), imported by path, and compared with the reference model of the same weights.
Heads trained on the release's features refuse such features unless --trust-features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from aqa_cli.backbones import create_backbone
from aqa_cli.backbones.vst import SWIN_B, SwinConfig, infer_config, state_dict_from_official
from aqa_cli.cache import FeatureCache
from aqa_cli.cli import app
from aqa_cli.errors import FeatureError, WeightsError
from aqa_cli.evaluation import evaluate
from aqa_cli.heads import create_head
from aqa_cli.heads.checkpoint import save_head
from aqa_cli.presets import load_preset
from aqa_cli.recipes import GDLT_RECIPE
from aqa_cli.scoring import Scorer, choose_heads
from aqa_cli.synthetic import moving_scene, write_video
from conftest import invoke_aqa
from aqa_cli.weights import import_file
from test_vst import cosine, official_shapes, random_official_state, reference_model, registry, save_mmcv  # noqa: F401

# Not the release: 400 classes, another width, depth and window than Swin-B's.
MINE = SwinConfig(patch_size=(2, 4, 4), embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                  window_size=(2, 7, 7), num_classes=400)


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("AQA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AQA_OFFLINE", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def mine_state():
    return random_official_state(MINE, seed=5)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """2 clips of the GDLT recipe (32 frames at 25 fps), small frames."""
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", moving_scene(70, 120, 160, seed=4), 25)


def clips(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, 8, 64, 64, 3), dtype=np.uint8)


def reference_features(state: dict, cfg: SwinConfig, batch: np.ndarray) -> np.ndarray:
    ref = reference_model(state, cfg)
    x = GDLT_RECIPE.normalize(torch.from_numpy(batch))
    with torch.inference_mode():
        return ref.norm(ref.features(ref.patch_embed(x))).mean(dim=(1, 2, 3)).numpy()


def test_an_official_layout_video_swin_that_is_not_the_release_loads_by_path(home, mine_state, monkeypatch):
    # What mmcv writes, optimizer state included, saved from a DataParallel wrapper.
    path = home / "my_finetuned_swin.pth"
    torch.save({"meta": {"mmcv_version": "1.3.1", "best_score": np.float64(0.9)},
                "state_dict": {f"module.{k}": v for k, v in mine_state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}}, path)
    bb = create_backbone("vst", device="cpu", weights=str(path))
    batch = clips()
    feats, logits = bb(batch)
    ref = reference_features(mine_state, MINE, batch)
    assert feats.shape == (2, 256) and logits.shape == (2, 400) and bb.spec.feature_dim == 256
    assert min(cosine(a, b) for a, b in zip(feats, ref)) > 0.999
    np.testing.assert_allclose(feats, ref, atol=1e-5, rtol=1e-5)
    assert bb.class_names is not None and len(bb.class_names) == 400  # torchvision's Kinetics-400, assumed
    from aqa_cli.weights import sha256_file

    digest = sha256_file(path)
    identity = bb.identity()
    assert identity["weights"] == f"file:{digest}"
    assert identity["weights_source"] == {"path": str(path.resolve()), "sha256": digest, "format": "mmcv"}
    converted = list((home / "home" / "weights" / "user" / "swin3d_b").glob("*.safetensors"))
    assert [p.name for p in converted] == [f"{digest}.safetensors"]

    # Converted once: the same bytes under another name are found in the cache without converting again.
    import aqa_cli.weights as weights

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(weights, "save_safetensors", no_second_conversion)
    copy = home / "renamed.pth"
    copy.write_bytes(path.read_bytes())
    again = create_backbone("vst", device="cpu", weights=str(copy))
    assert again.weights_sha256 == bb.weights_sha256 and again.weights_source["path"] == str(copy.resolve())
    # Another instance of the same weights: equal within float tolerance (bitwise only within one instance).
    np.testing.assert_allclose(again(batch)[0], feats, atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(bb(batch)[0], feats)


def test_config_is_read_from_the_shapes_for_swin_b_and_a_headless_file(home, mine_state):
    with torch.device("meta"):
        official = {k: torch.empty(s) for k, s in official_shapes(SWIN_B).items()}
    renamed, unexpected = state_dict_from_official(official)
    assert not unexpected and infer_config(renamed, 600) == SWIN_B
    # A backbone saved without its classifier gives features and no logits.
    path = save_mmcv(home / "backbone_only.pth", {k: v for k, v in mine_state.items() if not k.startswith("cls_head")})
    bb = create_backbone("vst", device="cpu", weights=str(path))
    feats, logits = bb(clips(1))
    assert logits is None and feats.shape == (2, 256)
    np.testing.assert_allclose(feats, reference_features(mine_state, MINE, clips(1)), atol=1e-5, rtol=1e-5)


def test_bad_checkpoints_by_path_are_refused_in_one_line(home, mine_state, video):
    state = dict(mine_state)
    cases = {
        "i3d.pth": ({"Conv3d_1a_7x7.conv.weight": torch.zeros(64, 3, 7, 7, 7), "Mixed_5c.b0.conv.weight":
                     torch.zeros(1)}, "is a DeepMind I3D checkpoint, not a Video Swin checkpoint"),
        "x3d.pyth": ({"model_state": {"blocks.0.conv.conv_t.weight": torch.zeros(24, 24, 5, 1, 1)}},
                     "is a pytorchvideo X3D checkpoint"),
        "missing.pth": ({"state_dict": {k: v for k, v in state.items() if k != "backbone.layers.1.blocks.0.attn.qkv.weight"}},
                        "missing: backbone.layers.1.blocks.0.attn.qkv.weight"),
        "extra.pth": ({"state_dict": {**state, "backbone.extra_adapter.weight": torch.zeros(3)}},
                      "no Swin3D counterpart: backbone.extra_adapter.weight"),
        "classes.pth": ({"state_dict": {**state, "cls_head.fc_cls.bias": torch.zeros(600)}},
                        "wrong class count: the classifier's weight has 400 classes, its bias 600"),
    }
    for name, (obj, expected) in cases.items():
        torch.save(obj, home / name)
        with pytest.raises(WeightsError, match=expected.replace("(", r"\(")):
            create_backbone("vst", device="cpu", weights=str(home / name))
    res = invoke_aqa("extract-features", video, "--out", home / "f", "--backbone", "vst",
                     "--weights", home / "x3d.pyth")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "use --backbone x3d-m" in res.stderr
    res = invoke_aqa("extract-features", video, "--out", home / "f", "--backbone", "vst",
                     "--weights", home / "absent.pth")
    assert res.returncode == 2 and "absent.pth: no such checkpoint file" in res.stderr


def test_a_registry_entry_keeps_its_class_count(registry, mine_state):
    # The small test entry is a 600-class model like the release; a 400-class file of the same size is refused
    # and told where a file of one's own goes.
    torch.save(reference_model(mine_state, MINE).state_dict(), registry / "k400.pth")
    with pytest.raises(WeightsError, match="its classifier has 400 classes but these weights are a 600-class model "
                                           r"\(a checkpoint of your own goes by path: --weights FILE"):
        import_file("vst-test", registry / "k400.pth")


def vst_head(path: Path, dim: int = 256) -> Path:
    """An untrained gdlt head on release (vst-k600) features of ``dim`` values, as `aqa train` records it."""
    torch.manual_seed(0)
    settings = {**load_preset("fisv-tes").model_settings("gdlt"), "in_dim": dim}
    meta = {"preset": "fisv-tes", "target": "TES", "scale": {"score_min": 0.0, "score_max": 50.0, "unit": "points"},
            "contract": {"backbone": "vst", "feature_dim": dim, "recipe": None}}
    return save_head(path, [create_head("gdlt", settings).eval()], meta)


@pytest.mark.slow
def test_heads_refuse_a_user_checkpoints_features_unless_trusted(home, mine_state, video):
    ckpt = save_mmcv(home / "mine.pth", mine_state)
    head = vst_head(home / "head.safetensors")
    with pytest.raises(FeatureError, match="trained on vst-k600 features; another checkpoint's features"):
        Scorer(choose_heads(weights=head), device="cpu", backbone_weights=str(ckpt))
    cache = FeatureCache(home / "features")
    scorer = Scorer(choose_heads(weights=head), device="cpu", backbone_weights=str(ckpt), trust_features=True,
                    cache=cache)
    [first] = scorer.score(video)
    assert first.ok, first.error
    assert any("--trust-features" in w for w in first.warnings)
    [again] = Scorer(choose_heads(weights=head), device="cpu", backbone_weights=str(ckpt), trust_features=True,
                     cache=cache).score(video)
    assert again.features_source == "cache" and again.score == pytest.approx(first.score, abs=1e-6)
    [entry] = list((home / "features").rglob("*.json"))
    made_by = json.loads(entry.read_text())["backbone"]
    assert made_by["weights"].startswith("file:") and made_by["weights_source"]["path"] == str(ckpt.resolve())

    # extract-features records the file in the sidecar; scoring that feature file follows the same rule.
    cli = CliRunner()
    res = cli.invoke(app, ["extract-features", str(video), "--out", str(home / "f"), "--backbone", "vst",
                           "--weights", str(ckpt)])
    assert res.exit_code == 0, res.output
    sidecar = json.loads((home / "f" / "clip.json").read_text())
    assert sidecar["backbone"]["weights_source"]["sha256"] == made_by["weights"].removeprefix("file:")
    res = cli.invoke(app, ["score", str(home / "f" / "clip.npy"), "--weights", str(head)])
    assert res.exit_code == 1 and "pass --trust-features" in " ".join(res.output.split())
    res = cli.invoke(app, ["score", str(home / "f" / "clip.npy"), "--weights", str(head), "--trust-features", "--json"])
    assert res.exit_code == 0, res.output
    scored = json.loads(res.stdout)
    assert scored["score"] == pytest.approx(first.score, abs=1e-4) and "--trust-features" in " ".join(scored["warnings"])

    # aqa evaluate keeps the same rule for a labelled folder of such features.
    folder = home / "labelled"
    folder.mkdir()
    features = np.load(home / "f" / "clip.npy")
    for k in range(3):
        np.save(folder / f"v{k}.npy", features + 0.01 * k)
        (folder / f"v{k}.json").write_text((home / "f" / "clip.json").read_text())
    (folder / "labels.csv").write_text("id,TES\nv0,10\nv1,20\nv2,30\n")
    with pytest.raises(FeatureError, match="trained on vst-k600 features"):
        evaluate(folder, folder / "labels.csv", [head])
    [result], _ = evaluate(folder, folder / "labels.csv", [head], trust_features=True)
    assert result.metrics["n"] == 3 and any("--trust-features" in n for n in result.notes)
