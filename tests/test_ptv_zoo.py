"""The pytorchvideo zoo backbones (X3D-M, SlowFast-R50, MViT-B 16x4) with random weights, on the CPU.

The zoo's checkpoints are not downloaded here. Each test checkpoint is made the way the zoo's files
are: pytorchvideo's own hub builder (``pretrained=False``), randomly initialised, its state dict saved
as a PySlowFast checkpoint (``{"epoch", "model_state", "optimizer_state", "cfg"}``). It is imported
through the registry like the real file, and our features and logits are compared with what
pytorchvideo's model computes, read with hooks on its classifier (the classifier's input, averaged
over positions, is the feature; its output, averaged likewise, the logits).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from aqa_cli.backbones import create_backbone, get_backbone_spec
from aqa_cli.backbones.ptv_zoo import MVIT_B_16X4, SLOWFAST_R50, X3D_M, ZOO, ZooModel
from aqa_cli.cli import app
from aqa_cli.errors import WeightsError
from aqa_cli.synthetic import moving_scene, write_video
from aqa_cli.weights import import_file, read_safetensors

pytestmark = pytest.mark.slow  # each family runs its real network on full-size clips (seconds each)


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("AQA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AQA_OFFLINE", raising=False)
    return tmp_path


def zoo_net(model: ZooModel, seed: int = 0, num_classes: int = 400) -> torch.nn.Module:
    """pytorchvideo's model with random weights, norm statistics included (so a misplaced one shows)."""
    torch.manual_seed(seed)
    net = model.build_net(num_classes).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def save_zoo_checkpoint(path, net: torch.nn.Module):
    # PySlowFast's save_checkpoint layout; the config is stored as its YAML dump (a string).
    torch.save({"epoch": 196, "model_state": net.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
                "cfg": "MODEL:\n  NUM_CLASSES: 400\n"}, path)
    return path


def recipe_clip(model: ZooModel, seed: int = 0) -> np.ndarray:
    """One clip of the recipe's length; 224x224, the smallest size every family's head pooling takes."""
    return np.random.default_rng(seed).integers(0, 256, (1, model.recipe.clip_len, 224, 224, 3), dtype=np.uint8)


def pytorchvideo_outputs(net: torch.nn.Module, model: ZooModel, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(classifier input, classifier output), each averaged over positions, from pytorchvideo's own forward."""
    proj = net.head.proj if model is MVIT_B_16X4 else net.blocks[-1].proj
    seen = {}
    handle = proj.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    if model.recipe.slowfast_alpha:  # PySlowFast's PackPathway, written out here
        t = x.shape[2]
        x = [x[:, :, torch.linspace(0, t - 1, t // model.recipe.slowfast_alpha).long()], x]
    with torch.inference_mode():
        net(x)
    handle.remove()
    feats, logits = seen["x"], seen["y"]
    if feats.dim() == 5:  # ResNetBasicHead projects each position of a [B, t, h, w, C] map
        feats, logits = feats.mean(dim=(1, 2, 3)), logits.mean(dim=(1, 2, 3))
    return feats.numpy(), logits.numpy()


@pytest.mark.parametrize("model", ZOO, ids=lambda m: m.backbone)
def test_a_zoo_checkpoint_imports_and_gives_pytorchvideos_features(home, model):
    net = zoo_net(model)
    ckpt = save_zoo_checkpoint(home / model.url.rsplit("/", 1)[1], net)
    target = import_file(model.weights, ckpt)
    _, meta = read_safetensors(target)
    assert meta["source_format"] == "pytorchvideo" and "trusted on first use" in meta["source_check"]

    bb = create_backbone(model.backbone, device="cpu")
    assert bb.recipe == model.recipe and bb.spec.feature_dim == model.feature_dim
    assert len(bb.class_names) == 400 and bb.class_names[0] == "abseiling" and bb.class_names[-1] == "zumba"
    clip = recipe_clip(model)
    feats, logits = bb(clip)
    assert feats.shape == (1, model.feature_dim) and logits.shape == (1, 400)
    ref_feats, ref_logits = pytorchvideo_outputs(net, model, model.recipe.normalize(torch.from_numpy(clip)))
    np.testing.assert_allclose(feats, ref_feats, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # The same instance twice: bitwise. Another instance of the same weights: within float tolerance
    # (checked on the cheapest family only; the code path is the same).
    again, _ = bb(clip)
    np.testing.assert_array_equal(again, feats)
    if model is X3D_M:
        other, _ = create_backbone(model.backbone, device="cpu")(clip)
        np.testing.assert_allclose(other, feats, atol=1e-5, rtol=1e-5)


def test_the_recipes_are_written_down_as_published():
    # PySlowFast's test settings for each config (30 fps, frames x sampling rate, short side = test crop).
    want = {
        "x3d-m": dict(fps=30.0, clip_len=16, sampling_rate=5, resize_short=256, crop=(256, 256), slowfast_alpha=None),
        "slowfast-r50": dict(fps=30.0, clip_len=32, sampling_rate=2, resize_short=256, crop=(256, 256),
                             slowfast_alpha=4),
        "mvit-b-16x4": dict(fps=30.0, clip_len=16, sampling_rate=4, resize_short=224, crop=(224, 224),
                            slowfast_alpha=None),
    }
    for name, fields in want.items():
        recipe = get_backbone_spec(name).recipe
        for key, value in fields.items():
            assert getattr(recipe, key) == value, (name, key)
        assert recipe.stride == recipe.clip_len and recipe.final_size is None
        assert recipe.mean == (0.45, 0.45, 0.45) and recipe.std == (0.225, 0.225, 0.225)
        assert recipe.timeline_fps == 30.0 / fields["sampling_rate"]
    assert [get_backbone_spec(m.backbone).feature_dim for m in ZOO] == [2048, 2304, 768]
    # The new recipe fields are left out at their defaults, so older recipes keep their identity.
    assert "sampling_rate" not in get_backbone_spec("i3d").recipe.to_dict()
    assert get_backbone_spec("slowfast-r50").recipe.to_dict()["slowfast_alpha"] == 4


def test_zoo_checkpoints_are_checked_key_by_key(home):
    state = zoo_net(X3D_M).state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.1.res_blocks.0.branch2.conv_a.weight"},
                    "missing: blocks.1.res_blocks.0.branch2.conv_a.weight"),
        "extra": ({**state, "blocks.9.adapter.weight": torch.zeros(2)}, "unexpected: blocks.9.adapter.weight"),
        "classes": ({**state, "blocks.5.proj.bias": torch.zeros(600)},
                    "wrong class count: the classifier's weight has 400 classes, its bias 600"),
        "family": (zoo_net(SLOWFAST_R50).state_dict(), "this is a pytorchvideo SlowFast checkpoint, not a "
                                                       "pytorchvideo x3d_m checkpoint; use --backbone slowfast-r50"),
    }
    for name, (sd, expected) in cases.items():
        torch.save({"model_state": sd}, home / f"{name}.pyth")
        with pytest.raises(WeightsError, match=expected):
            import_file("x3d-m-k400", home / f"{name}.pyth")
    # A registry entry keeps its class count; a fine-tuned model of another goes by path, with its own.
    torch.save({"model_state": zoo_net(X3D_M, num_classes=7).state_dict()}, home / "mine.pyth")
    with pytest.raises(WeightsError, match="its classifier has 7 classes but x3d-m-k400 is a 400-class model"):
        import_file("x3d-m-k400", home / "mine.pyth")
    bb = create_backbone("x3d-m", device="cpu", weights=str(home / "mine.pyth"))
    assert bb.class_names is None and bb.weights_source["format"] == "pytorchvideo"
    assert bb(recipe_clip(X3D_M))[1].shape == (1, 7)


def test_extract_features_with_a_zoo_backbone_records_its_recipe_and_kinetics_names(home):
    import_file(X3D_M.weights, save_zoo_checkpoint(home / "X3D_M.pyth", zoo_net(X3D_M)))
    # 6 s at 25 fps: two X3D-M clips of 16 frames on the 6 fps timeline (every 5th frame at 30 fps).
    video = write_video(home / "v.mp4", moving_scene(150, 176, 320, seed=2), 25)
    res = CliRunner().invoke(app, ["extract-features", str(video), "--out", str(home / "f"), "--backbone", "x3d-m",
                                   "--show-pred", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    sidecar = json.loads((home / "f" / "v.json").read_text())
    assert sidecar["recipe"]["sampling_rate"] == 5 and sidecar["shape"] == [2, 2048]
    # 36 frames on the 6 fps timeline: 2 clips, the 4 left over trimmed equally (2 at the head, 1/3 s).
    first = sidecar["clips"][0]
    assert first["start_s"] == pytest.approx(2 / 6) and first["end_s"] - first["start_s"] == pytest.approx(16 * 5 / 30)
    assert len(sidecar["predictions"]) == 5 and all(not p["label"].isdigit() for p in sidecar["predictions"])
    assert np.load(home / "f" / "v.npy").shape == (2, 2048)
