"""The Video Swin backbone, the GDLT recipe and the weights registry, on the CPU without downloads.

The real Kinetics-600 checkpoint (365 MiB) is not fetched here. Its key names and
shapes are generated from the official SwinTransformer3D's definition, filled
with random values, and imported through the same code path as the real file.
Only one test runs the full Swin-B, on one clip; the rest use a small config.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import pickle
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import aqa_cli.backbones as backbones
from aqa_cli.backbones import BackboneSpec, create_backbone, get_backbone_spec
from aqa_cli.backbones.vst import (
    K600_LABELS_SHA256,
    FusedWindowAttention3d,
    SWIN_B,
    VST_K600,
    SwinConfig,
    VideoSwin,
    build_swin3d,
    convert_checkpoint,
    detect_format,
    state_dict_from_official,
    use_fused_attention,
)
from aqa_cli.cli import app
from aqa_cli.errors import WeightsError
from aqa_cli.recipes import GDLT_RECIPE, Recipe
from aqa_cli.video import open_video
from aqa_cli.weights import WeightsSpec, fetch, import_file, labels_sha256, read_labels, read_safetensors
from conftest import invoke_aqa

# Small enough to run in milliseconds, deep enough that every stage has a shifted-window block,
# and a window that forces padding (28 and 14 tokens are not multiples of 7... 4 of 8 is handled too).
SMALL = SwinConfig(patch_size=(2, 4, 4), embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                   window_size=(2, 7, 7), num_classes=600)
SMALL_RECIPE = GDLT_RECIPE.replace(name="gdlt-small-test", clip_len=8, stride=8, final_size=(112, 112))


# ------------------------------------------------------------------------------ official checkpoints, from scratch

def official_index(window: tuple[int, int, int]) -> torch.Tensor:
    """relative_position_index as the official WindowAttention3D computes it."""
    wd, wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1])
    return rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]


def official_shapes(cfg: SwinConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official mmaction checkpoint (SwinTransformer3D + I3DHead) with its shape,
    written from the official module definitions, not from our converter."""
    c = cfg.embed_dim
    wd, wh, ww = cfg.window_size
    table = (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1)
    shapes: dict[str, tuple[int, ...]] = {
        "backbone.patch_embed.proj.weight": (c, 3, *cfg.patch_size),
        "backbone.patch_embed.proj.bias": (c,),
        "backbone.patch_embed.norm.weight": (c,),  # patch_norm=True in the Kinetics-600 config
        "backbone.patch_embed.norm.bias": (c,),
    }
    for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
        dim = c * 2**i
        for j in range(depth):
            b = f"backbone.layers.{i}.blocks.{j}."
            shapes.update({
                b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                b + "attn.relative_position_bias_table": (table, heads),
                b + "attn.relative_position_index": (wd * wh * ww, wd * wh * ww),
                b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,),
            })
        if i < len(cfg.depths) - 1:
            d = f"backbone.layers.{i}.downsample."
            shapes.update({d + "reduction.weight": (2 * dim, 4 * dim), d + "norm.weight": (4 * dim,),
                           d + "norm.bias": (4 * dim,)})
    top = c * 2 ** (len(cfg.depths) - 1)
    shapes.update({"backbone.norm.weight": (top,), "backbone.norm.bias": (top,),
                   "cls_head.fc_cls.weight": (cfg.num_classes, top), "cls_head.fc_cls.bias": (cfg.num_classes,)})
    return shapes


def random_official_state(cfg: SwinConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(cfg).items():
        if key.endswith("relative_position_index"):
            state[key] = official_index(cfg.window_size)
        elif "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.2 * torch.randn(shape, generator=g)  # not identity, so a misplaced norm shows
        else:
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


def to_torchvision(key: str) -> str:
    """The issue's renaming table, applied by hand (independently of aqa_cli.backbones.vst)."""
    if key.startswith("cls_head.fc_cls."):
        return "head." + key.rsplit(".", 1)[1]
    key = key.removeprefix("backbone.")
    parts = key.split(".")
    if parts[0] != "layers":
        return key
    i = int(parts[1])
    if parts[2] == "downsample":
        return ".".join([f"features.{2 * i + 1}", *parts[3:]])
    rest = ".".join(parts[4:]).replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
    return f"features.{2 * i}.{parts[3]}.{rest}"


def save_mmcv(path: Path, state: dict, **meta) -> Path:
    # What mmcv's save_checkpoint writes: training metadata (numpy values included) beside the weights.
    torch.save({"meta": {"mmcv_version": "1.3.1", "time": "Sat Jun 19 2021", "best_score": np.float64(0.84), **meta},
                "state_dict": state}, path)
    return path


def reference_model(state: dict[str, torch.Tensor], cfg: SwinConfig) -> torch.nn.Module:
    net = build_swin3d(cfg)
    net.load_state_dict({to_torchvision(k): v for k, v in state.items()}, strict=True)
    return net.eval()


# ------------------------------------------------------------------------------------ a test registry entry

TEST_WEIGHTS = WeightsSpec(
    name="vst-test", kind="backbone", architecture="swin3d-small-test",
    description="small random Video Swin for tests", source="built by the test", source_sha256="",
    convert=partial(convert_checkpoint, config=SMALL), url=None, formats=("mmcv", "torchvision"),
    detect=detect_format, labels_sha256=K600_LABELS_SHA256,
)
TEST_BACKBONE = BackboneSpec(name="vst-test", description="small random Video Swin", weights="vst-test",
                             recipe=SMALL_RECIPE, feature_dim=SMALL.feature_dim, build=get_backbone_spec("vst").build)


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A fresh AQA_HOME and a registry that also knows the small test weights and backbone."""
    monkeypatch.setenv("AQA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AQA_OFFLINE", raising=False)
    monkeypatch.setitem(backbones.weights_specs(), "vst-test", TEST_WEIGHTS)
    monkeypatch.setitem(backbones._registry(), "vst-test", TEST_BACKBONE)
    return tmp_path


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------- key mapping

def test_official_checkpoint_imports_and_gives_the_features_of_the_same_weights(registry, shared):
    state = random_official_state(SMALL)
    ckpt = save_mmcv(registry / "official.pth", state)
    labels = shared / "data" / "kinetics" / "label_map_k600.txt"
    res = CliRunner().invoke(app, ["weights", "import", str(ckpt), "--name", "vst-test", "--labels", str(labels)])
    assert res.exit_code == 0, res.output
    assert "trusted on first use" in res.output

    bb = create_backbone("vst-test", device="cpu")
    assert bb.class_names == read_labels(labels)
    clips = np.random.default_rng(0).integers(0, 256, (2, 8, 112, 112, 3), dtype=np.uint8)
    feats, logits = bb(clips)

    ref = reference_model(state, SMALL)
    x = SMALL_RECIPE.normalize(torch.from_numpy(clips))
    with torch.inference_mode():
        tokens = ref.norm(ref.features(ref.patch_embed(x)))  # B T H W C after the final LayerNorm
        ref_feats = tokens.mean(dim=(1, 2, 3))
        ref_logits = ref(x)  # torchvision's own forward: our wrapper must not change the head's input
    assert feats.shape == (2, 256) and logits.shape == (2, 600)
    np.testing.assert_allclose(feats, ref_feats.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-5, rtol=1e-5)

    _, meta = read_safetensors(Path(os.environ["AQA_HOME"]) / "weights" / "vst-test.safetensors")
    assert meta["source_format"] == "mmcv" and "trusted on first use" in meta["source_check"]
    assert "matches the pinned label map" in meta["classes_source"]
    assert labels_sha256(read_labels(labels)) == K600_LABELS_SHA256

    # Trust on first use: another file under the same name is refused, naming the first sha256.
    other = save_mmcv(registry / "other.pth", random_official_state(SMALL, seed=1))
    with pytest.raises(WeightsError, match="differs from the .* accepted the first time"):
        import_file("vst-test", other)


def test_torchvision_state_dicts_are_accepted_and_detected(registry):
    state = random_official_state(SMALL, seed=2)
    tv = {to_torchvision(k): v for k, v in state.items()}
    path = registry / "swin3d_small.pth"
    torch.save(tv, path)
    import_file("vst-test", path)  # --format auto
    _, meta = read_safetensors(Path(os.environ["AQA_HOME"]) / "weights" / "vst-test.safetensors")
    assert meta["source_format"] == "torchvision" and meta["source_check"].startswith("unpinned")
    with pytest.raises(WeightsError, match="looks like a torchvision checkpoint, not mmcv"):
        import_file("vst-test", path, fmt="mmcv")


def test_swin_b_key_set_matches_torchvision_swin3d_b():
    shapes = official_shapes(SWIN_B)
    assert len(shapes) == 353  # 351 backbone tensors and the 600-class head
    renamed, unexpected = state_dict_from_official(shapes)
    assert unexpected == []
    with torch.device("meta"):
        from torchvision.models.video import swin3d_b

        expected = swin3d_b(num_classes=600).state_dict()
    assert {k: tuple(v.shape) for k, v in expected.items()} == renamed
    assert renamed == {to_torchvision(k): v for k, v in shapes.items()}


@pytest.mark.slow
def test_one_swin_b_clip_gives_the_published_feature_map():
    """The only full Swin-B forward in the suite: one 32x224x224 clip, random weights."""
    torch.manual_seed(0)
    net = build_swin3d(SWIN_B).eval()
    arch = net.patch_embed.proj
    assert arch.kernel_size == (2, 4, 4) and arch.out_channels == 128
    assert [len(net.features[i]) for i in (0, 2, 4, 6)] == [2, 2, 18, 2]
    assert [net.features[i][0].attn.num_heads for i in (0, 2, 4, 6)] == [4, 8, 16, 32]
    assert net.features[0][0].attn.window_size == [8, 7, 7]
    model = VideoSwin(net)
    x = torch.randn(1, 3, 32, 224, 224)
    with torch.inference_mode():
        fmap = model.feature_map(x)
        # VideoSwin.forward's pooling and head, applied to this map (a second forward would double the cost).
        features = torch.flatten(net.avgpool(fmap), 1)
        logits = net.head(features)
    assert fmap.shape == (1, 1024, 16, 7, 7)
    assert features.shape == (1, 1024) and logits.shape == (1, 600)
    torch.testing.assert_close(features, fmap.mean(dim=(2, 3, 4)))


def test_bf16_on_cpu_runs_and_stays_close_to_fp32(registry):
    save_mmcv(registry / "official.pth", random_official_state(SMALL, seed=3))
    import_file("vst-test", registry / "official.pth")
    clips = np.random.default_rng(1).integers(0, 256, (2, 8, 112, 112, 3), dtype=np.uint8)
    fp32, _ = create_backbone("vst-test", device="cpu")(clips)
    bb = create_backbone("vst-test", device="cpu", precision="bf16")
    # bf16 weights and activations, not autocast: every parameter is converted.
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    bf16, logits = bb(clips)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all() and np.isfinite(logits).all()
    # The bound --precision auto is held to (per-clip cosine against fp32).
    assert min(cosine(a, b) for a, b in zip(fp32, bf16)) >= 0.999


# ------------------------------------------------------------------------------------------ the fused attention

@pytest.mark.parametrize("shape", [(2, 3, 8, 112, 112), (1, 3, 12, 100, 90), (1, 3, 4, 64, 64)],
                         ids=["batch2", "padded", "window-clipped"])
def test_fused_attention_matches_torchvision(shape):
    # Random weights, small inputs: shifted and plain windows, a batch, a grid that needs padding
    # (25x23 tokens for 7x7 windows), and one no larger than the window (clipped, not shifted).
    torch.manual_seed(0)
    ref = build_swin3d(SMALL).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1.0)  # larger than the init's 0.02, so a misplaced bias would show
    fused = use_fused_attention(copy.deepcopy(ref))
    assert sum(isinstance(m, FusedWindowAttention3d) for m in fused.modules()) == sum(SMALL.depths)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = ref(x), fused(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert fused.state_dict().keys() == ref.state_dict().keys()  # the same checkpoint loads into both


def test_attention_mask_is_built_once_per_shape_and_shift():
    torch.manual_seed(0)
    net = use_fused_attention(build_swin3d(SMALL)).eval()
    blocks = [m for m in net.modules() if isinstance(m, FusedWindowAttention3d)]
    # 112 and 160 pixels give other padded token grids at every stage (96 would pad to the same as 112).
    small, other = torch.randn(1, 3, 8, 112, 112), torch.randn(2, 3, 8, 160, 160)
    with torch.inference_mode():
        first = net(small)
        assert [b.mask_builds for b in blocks] == [1] * len(blocks)
        again = net(small)
        assert [b.mask_builds for b in blocks] == [1] * len(blocks)  # reused, not rebuilt
        net(other)  # another grid: one more mask each (the batch size is not part of the key)
        net(other[:1])
        assert [b.mask_builds for b in blocks] == [2] * len(blocks)
    assert torch.equal(first, again)  # the same instance twice: bitwise
    # New weights in the bias tables invalidate the cached masks: the output follows the weights.
    ref = build_swin3d(SMALL).eval()
    net.load_state_dict(ref.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(net(small), ref(small), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- the recipe

def test_gdlt_recipe_is_written_down_as_published():
    assert get_backbone_spec("vst").recipe is GDLT_RECIPE
    assert GDLT_RECIPE.to_dict() == {
        "name": "gdlt", "fps": 25.0, "clip_len": 32, "stride": 32, "leftover": "trim", "resize_short": 256,
        "crop": [224, 300], "final_size": [224, 224],
        "mean": [123.675 / 255, 116.28 / 255, 103.53 / 255], "std": [58.395 / 255, 57.12 / 255, 57.375 / 255],
        "interpolation": "bilinear", "antialias": True}


def test_gdlt_geometry_matches_an_independent_pil_computation(shared):
    with open_video(shared / "videos" / "arm_wrestling.mp4") as reader:
        (_, frames), = reader.iter_chunks([40])
    frame = frames[0]
    assert frame.shape == (256, 340, 3)  # already 256 high: the resize is the identity here
    img = Image.fromarray(frame)
    # A larger copy of the same frame exercises the resize itself.
    big = np.array(img.resize((680, 512), Image.BICUBIC))

    # 1. short side to 256; long side floor(256 * long / short).
    assert GDLT_RECIPE.resized_size(512, 680) == (256, 680 * 256 // 512) == (256, 340)
    assert GDLT_RECIPE.resized_size(1080, 1920) == (256, 455) and GDLT_RECIPE.resized_size(1920, 1080) == (455, 256)
    ours = Recipe(name="resize-only", fps=None, crop=(256, 340)).transform_frames(big[None])[0]
    pil = np.asarray(Image.fromarray(big).resize((340, 256), Image.BILINEAR))
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert ours.shape == (256, 340, 3) and diff.mean() < 0.05 and diff.max() <= 1

    # 2. centre crop 224 high x 300 wide at ((256 - 224) / 2, (340 - 300) / 2).
    assert GDLT_RECIPE.crop_box(256, 340) == (16, 20, 224, 300)
    crop_only = replace(GDLT_RECIPE, name="crop-only", final_size=None)
    ours = crop_only.transform_frames(frame[None])[0]
    assert np.array_equal(ours, np.asarray(img.crop((20, 16, 320, 240))))

    # 3. squash 224x300 to 224x224: the width shrinks, the height does not.
    ours = GDLT_RECIPE.transform_frames(frame[None])[0]
    pil = np.asarray(img.crop((20, 16, 320, 240)).resize((224, 224), Image.BILINEAR))
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert ours.shape == (224, 224, 3) and diff.mean() < 0.05 and diff.max() <= 1

    # The whole chain on the large frame against PIL's whole chain.
    ours_big = GDLT_RECIPE.transform_frames(big[None])[0]
    pil_big = Image.fromarray(big).resize((340, 256), Image.BILINEAR).crop((20, 16, 320, 240)).resize((224, 224),
                                                                                                        Image.BILINEAR)
    assert np.abs(ours_big.astype(int) - np.asarray(pil_big).astype(int)).mean() < 0.1

    # 4. normalisation with ImageNet statistics on the 0-255 scale, channels first.
    x = GDLT_RECIPE.normalize(torch.from_numpy(ours)[None, None])
    assert x.shape == (1, 3, 1, 224, 224) and x.dtype == torch.float32
    expected = (ours.astype(np.float64) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    np.testing.assert_allclose(x[0, :, 0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------- wrong input

def test_wrong_architecture_is_refused_naming_the_keys(registry):
    shallow = replace(SMALL, depths=(2, 2, 1, 2))
    state = random_official_state(shallow)
    state["backbone.extra_norm.weight"] = torch.ones(3)
    path = save_mmcv(registry / "shallow.pth", state)
    with pytest.raises(WeightsError, match=r"no Swin3D counterpart: backbone\.extra_norm\.weight"):
        import_file("vst-test", path)
    del state["backbone.extra_norm.weight"]
    save_mmcv(path, state)
    with pytest.raises(WeightsError) as exc:
        import_file("vst-test", path)
    assert "missing: backbone.layers.2.blocks.1.norm1.weight" in exc.value.message
    assert len(exc.value.message.splitlines()) == 1

    # Through the real registry and CLI: a small torchvision-format file is not Swin-B.
    tv = registry / "small_tv.pth"
    torch.save({to_torchvision(k): v for k, v in random_official_state(SMALL).items()}, tv)
    res = invoke_aqa("weights", "import", tv, "--name", "vst-k600", env={"AQA_HOME": str(registry / "home2")})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "not a Swin-B" in res.stderr
    assert "patch_embed.proj.weight (32, 3, 2, 4, 4) vs (128, 3, 2, 4, 4)" in res.stderr
    assert "missing: features.4.2.norm1.weight" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    # An official-format file is first held against the release's size.
    mm = save_mmcv(registry / "small_official.pth", random_official_state(SMALL))
    with pytest.raises(WeightsError, match="but the official vst-k600 checkpoint is 382,579,368 bytes"):
        import_file("vst-k600", mm)


def test_truncated_checkpoint_is_refused(registry):
    path = save_mmcv(registry / "official.pth", random_official_state(SMALL))
    data = path.read_bytes()
    cut = registry / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint, truncated or damaged") as exc:
        import_file("vst-test", cut)
    assert "download it again" in exc.value.message
    assert not (Path(os.environ["AQA_HOME"]) / "weights" / "vst-test.safetensors").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/aqa-vst-pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickle_with_code_is_refused(registry):
    Path("/tmp/aqa-vst-pwned").unlink(missing_ok=True)
    evil = registry / "evil.pth"
    torch.save({"meta": _Exploit(), "state_dict": random_official_state(SMALL)}, evil)
    raw = registry / "raw.pth"
    raw.write_bytes(pickle.dumps({"state_dict": _Exploit()}))
    for path in (evil, raw):
        with pytest.raises(WeightsError, match="refused") as exc:
            import_file("vst-test", path)
        assert "system" in exc.value.message and "do not load it" in exc.value.message
    assert not Path("/tmp/aqa-vst-pwned").exists()


# ------------------------------------------------------------------------------------- fetching and the registry

def test_missing_weights_offline_say_what_to_download_and_how_to_import(tmp_path):
    from aqa_cli.synthetic import index_frames, write_video

    video = write_video(tmp_path / "a.mp4", index_frames(40), 25)
    res = invoke_aqa("extract-features", video, "--out", tmp_path / "out", "--backbone", "vst",
                     env={"AQA_HOME": str(tmp_path / "home"), "AQA_OFFLINE": "1"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert VST_K600.url in res.stderr and "`aqa weights import FILE --name vst-k600`" in res.stderr


def test_unreachable_url_fails_in_one_line(registry, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/swin.pth"
    monkeypatch.setitem(backbones.weights_specs(), "vst-test", replace(TEST_WEIGHTS, url=url))
    with pytest.raises(WeightsError) as exc:
        fetch("vst-test", log=lambda m: None)
    msg = exc.value.message
    assert "could not download weights 'vst-test'" in msg and "`aqa weights import FILE --name vst-test`" in msg
    assert msg.count(url) == 1  # the address to download by hand, said once


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file, honouring "Range: bytes=N-" unless told to ignore it."""

    payload = b""
    ignore_range = False
    ranges: list[str | None] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng and not self.ignore_range else 0
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("ignore_range", [False, True])
def test_download_resumes_and_is_verified_before_conversion(registry, monkeypatch, ignore_range):
    ckpt = save_mmcv(registry / "official.pth", random_official_state(SMALL, seed=4))
    payload = ckpt.read_bytes()
    handler = type("H", (_RangeHandler,), {"payload": payload, "ignore_range": ignore_range, "ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/official.pth"
        spec = replace(TEST_WEIGHTS, url=url, source_size=len(payload))
        monkeypatch.setitem(backbones.weights_specs(), "vst-test", spec)
        downloads = Path(os.environ["AQA_HOME"]) / "weights" / "downloads"
        downloads.mkdir(parents=True)
        (downloads / "official.pth.part").write_bytes(payload[:1000])  # an interrupted earlier download
        seen: list[tuple[int, int | None]] = []
        fetch("vst-test", log=lambda m: None, progress=lambda done, total: seen.append((done, total)))
        assert handler.ranges == ["bytes=1000-"]
        assert seen[-1] == (len(payload), len(payload))
        assert list(downloads.iterdir()) == []  # the download is removed once converted
        assert create_backbone("vst-test", device="cpu").weights_sha256
    finally:
        server.shutdown()


def test_wrong_size_download_is_refused_before_conversion(registry, monkeypatch):
    ckpt = save_mmcv(registry / "official.pth", random_official_state(SMALL))
    spec = replace(TEST_WEIGHTS, source_size=ckpt.stat().st_size + 1)
    monkeypatch.setitem(backbones.weights_specs(), "vst-test", spec)
    with pytest.raises(WeightsError, match="bytes but the official vst-test checkpoint is"):
        import_file("vst-test", ckpt, fmt="mmcv")


def test_weights_list_labels_and_show_pred(registry, shared):
    from aqa_cli.synthetic import moving_scene, write_video

    res = CliRunner().invoke(app, ["weights", "list"], env={"COLUMNS": "300"})
    assert res.exit_code == 0
    # One block per entry: its name line, then where it comes from and its pin.
    lines = res.output.splitlines()
    first = next(k for k, line in enumerate(lines) if line.strip().startswith("vst-k600 "))
    row = " ".join(line.strip() for line in lines[first:first + 4])
    assert VST_K600.url in row and "382,579,368" in row and "trusted on first use" in row
    assert "24f7c7c6" in res.output and "af5c50f0df57cc48" in res.output

    import_file("vst-test", save_mmcv(registry / "official.pth", random_official_state(SMALL, seed=5)))
    video = write_video(registry / "v.mp4", moving_scene(20, 120, 160), 25)
    runner = CliRunner()
    res = runner.invoke(app, ["extract-features", str(video), "--out", str(registry / "out"), "--backbone", "vst-test",
                              "--show-pred"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "no class names" in res.output
    side = json.loads((registry / "out" / "v.json").read_text())
    assert side["recipe"]["name"] == "gdlt-small-test" and side["recipe"]["crop"] == [224, 300]
    assert side["predictions"][0]["label"] == str(side["predictions"][0]["index"])

    labels = shared / "data" / "kinetics" / "label_map_k600.txt"
    assert runner.invoke(app, ["weights", "labels", "vst-test", str(labels)]).exit_code == 0
    res = runner.invoke(app, ["extract-features", str(video), "--out", str(registry / "out2"), "--backbone",
                              "vst-test", "--show-pred"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "no class names" not in res.output
    names = read_labels(labels)
    side = json.loads((registry / "out2" / "v.json").read_text())
    assert all(p["label"] == names[p["index"]] for p in side["predictions"])
    res = runner.invoke(app, ["weights", "verify"])
    assert "ok" in res.output and "vst-test" in res.output

    short = registry / "short.txt"
    short.write_text("a\nb\n")
    assert runner.invoke(app, ["weights", "labels", "vst-test", str(short)]).exit_code != 0
    with pytest.raises(WeightsError, match="2 names but the vst-test classifier has 600 classes"):
        from aqa_cli.weights import set_labels

        set_labels("vst-test", short)


def test_weights_of_another_architecture_are_refused_for_a_backbone(registry):
    with pytest.raises(Exception, match="do not fit the vst backbone"):
        create_backbone("vst", device="cpu", weights="i3d-kinetics400")


# ------------------------------------------------------------------------------------------ precision, decoding

def test_auto_precision_is_resolved_and_recorded_in_the_sidecar(registry, monkeypatch):
    from aqa_cli.synthetic import moving_scene, write_video

    import_file("vst-test", save_mmcv(registry / "official.pth", random_official_state(SMALL, seed=6)))
    video = write_video(registry / "v.mp4", moving_scene(20, 120, 160), 25)
    reg = backbones._registry()
    within = replace(TEST_BACKBONE, bf16_within_bounds=True)
    runner = CliRunner()
    for native, spec, want in ((False, within, "fp32"), (True, within, "bf16"), (True, TEST_BACKBONE, "fp32")):
        monkeypatch.setattr(backbones, "native_bf16", lambda device, native=native: native)
        monkeypatch.setattr(backbones, "_registry", lambda spec=spec: {**reg, "vst-test": spec})
        assert backbones.resolve_precision("auto", torch.device("cpu"), spec) == want
        out = registry / f"out-{native}-{spec.bf16_within_bounds}"
        res = runner.invoke(app, ["extract-features", str(video), "--out", str(out), "--backbone", "vst-test",
                                  "--precision", "auto"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert f"({want}, chosen by auto)" in res.output
        side = json.loads((out / "v.json").read_text())
        assert side["backbone"]["precision"] == want  # what ran, never "auto"
    # Features made at another precision are not taken as done: the user is told, and --overwrite replaces them.
    res = runner.invoke(app, ["extract-features", str(video), "--out", str(registry / "out-True-True"),
                              "--backbone", "vst-test", "--precision", "fp32"], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "precision" in res.output and "bf16" in res.output
    with pytest.raises(backbones.AqaError, match="unknown precision"):
        backbones.resolve_precision("fp8", torch.device("cpu"), TEST_BACKBONE)


def test_cpu_bf16_detection_follows_the_cpu_flags():
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), None) \
        if Path("/proc/cpuinfo").is_file() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this system")
    native = bool({"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[1].split()))
    assert backbones.cpu_has_native_bf16() == native
    assert backbones.native_bf16(torch.device("cpu")) == native


def test_videos_decoded_ahead_give_the_same_features(registry):
    from aqa_cli.extract import extract_to_folder
    from aqa_cli.synthetic import moving_scene, write_video

    import_file("vst-test", save_mmcv(registry / "official.pth", random_official_state(SMALL, seed=7)))
    bb = create_backbone("vst-test", device="cpu")
    videos = [write_video(registry / f"v{i}.mp4", moving_scene(20 + 8 * i, 120, 160, seed=i), 25) for i in range(3)]
    (registry / "broken.mp4").write_bytes(b"not a video")
    videos.insert(1, registry / "broken.mp4")
    one = extract_to_folder(videos, bb, registry / "one", decode_workers=1, batch_size=2)
    three = extract_to_folder(videos, bb, registry / "three", decode_workers=3, batch_size=2)
    assert [o.status for o in one] == [o.status for o in three] == ["extracted", "failed", "extracted", "extracted"]
    assert three[1].error == one[1].error and "broken.mp4" in three[1].error
    for a, b in zip(one, three):
        if a.status == "extracted":
            # The same instance, the same clips: bitwise, whichever thread decoded them.
            assert np.array_equal(np.load(a.features_path), np.load(b.features_path))
