"""Every backbone's real bf16 forward, on every CPU.

Which code runs in bf16 depends on the CPU: where it computes bf16 natively (AVX-512 BF16, AMX),
``--precision auto`` picks bf16 and I3D's convolutions go to oneDNN; elsewhere bf16 runs only when asked for,
through torch's slow fallbacks. A path that only some CPUs take was once emulated on the others and crashed on
the real thing (torch's CPU ``avg_pool3d`` has no bf16 kernel, on any CPU). So these tests run the real bf16
forward of each backbone, on a small input, on whatever CPU runs the suite, and where a path is chosen by the
CPU (I3D's oneDNN convolution) they run each branch that this CPU can run, saying which one it cannot.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from aqa_cli.backbones import Backbone, place_model

CPU = torch.device("cpu")
# The bound --precision auto holds a backbone to (per-clip cosine against fp32, bench/bench_precision.py).
AUTO_BOUND = 0.999


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def small_clips(frames: int, size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """uint8 [B, T, size, size, 3]: smooth moving blobs, so features are not dominated by pixel noise."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size), np.arange(size), indexing="ij")
    clips = []
    for _ in range(batch):
        cy, cx, v = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(-1, 1)
        blob = np.exp(-((y - cy - v * t) ** 2 + (x - cx) ** 2) / (0.05 * size**2))
        rgb = np.stack([blob, 1 - blob, 0.5 + 0.5 * np.sin(x / 4.0)], axis=-1)
        clips.append((255 * rgb + rng.integers(0, 8, rgb.shape)).clip(0, 255))
    return np.stack(clips).astype(np.uint8)


@pytest.mark.parametrize("conv", ["onednn", "fallback"])
def test_i3d_real_weights_run_in_bf16_on_this_cpu(i3d, monkeypatch, conv):
    """I3D's bf16 forward through each convolution route: oneDNN's (taken where it has a bf16 convolution) and
    torch's own (taken elsewhere). The logits' pooling runs in float32 on both."""
    from aqa_cli.backbones import i3d as i3d_module

    if conv == "onednn" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 convolution on this CPU (it needs AVX-512 or AVX-NE-CONVERT); "
                    "this CPU takes the fallback route, tested beside this one")
    monkeypatch.setattr(i3d_module, "_mkldnn_bf16", lambda: conv == "onednn")
    model = place_model(copy.deepcopy(i3d.model), CPU, "bf16")
    bf16 = Backbone(i3d.spec, model, weights_sha256=i3d.weights_sha256, class_names=i3d.class_names, device=CPU,
                    precision="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    clips = small_clips(16, 64)
    (a, la), (b, lb) = i3d(clips), bf16(clips)
    assert b.dtype == np.float32 and np.isfinite(b).all() and np.isfinite(lb).all()
    assert cosines(a, b).min() >= AUTO_BOUND
    assert cosines(la, lb).min() >= AUTO_BOUND


def test_auto_picks_bf16_on_native_cpus_and_that_backbone_runs(i3d, monkeypatch):
    """What `--precision auto` builds on a bf16-native CPU, built here whatever this CPU is, and run."""
    import aqa_cli.backbones as backbones
    from aqa_cli.backbones import create_backbone

    monkeypatch.setattr(backbones, "native_bf16", lambda device: True)
    auto = create_backbone("i3d", device="cpu", precision="auto")
    assert auto.precision == "bf16" and {p.dtype for p in auto.model.parameters()} == {torch.bfloat16}
    clips = small_clips(16, 64, batch=1, seed=1)
    assert cosines(i3d(clips)[0], auto(clips)[0]).min() >= AUTO_BOUND


# The pytorchvideo zoo families, built by pytorchvideo's own builders at a small input size (the zoo's head
# pooling and MViT's position embeddings fix the input size of the released configurations). Every module type
# of the released networks is there: X3D's and SlowFast's heads pool with AvgPool3d, MViT pools attention.
def _small_x3d() -> torch.nn.Module:
    from pytorchvideo.models.x3d import create_x3d

    return create_x3d(input_clip_length=4, input_crop_size=64, model_num_class=400)


def _small_slowfast() -> torch.nn.Module:
    from pytorchvideo.models.slowfast import create_slowfast

    return create_slowfast(model_depth=50, slowfast_fusion_conv_kernel_size=(7, 1, 1), model_num_class=400,
                           head_pool_kernel_sizes=((2, 2, 2), (8, 2, 2)))


def _small_mvit() -> torch.nn.Module:
    from pytorchvideo.models.hub import mvit_base_16x4

    # The released depth (16) and stage plan, on 4x64x64 clips.
    return mvit_base_16x4(pretrained=False, spatial_size=64, temporal_size=4, head_num_classes=400)


SMALL_ZOO = {"x3d-m": (_small_x3d, 4), "slowfast-r50": (_small_slowfast, 8), "mvit-b-16x4": (_small_mvit, 4)}


@pytest.mark.parametrize("name", sorted(SMALL_ZOO))
def test_zoo_families_run_in_bf16_on_this_cpu(name):
    from aqa_cli.backbones import get_backbone_spec
    from aqa_cli.backbones.ptv_zoo import ZOO, ZooBackbone

    build, frames = SMALL_ZOO[name]
    zoo = next(m for m in ZOO if m.backbone == name)
    zoo = dataclasses.replace(zoo, recipe=zoo.recipe.replace(clip_len=frames, stride=frames, crop=(64, 64)))
    spec = dataclasses.replace(get_backbone_spec(name), recipe=zoo.recipe)
    torch.manual_seed(0)
    net = build().eval()
    with torch.no_grad():  # norm statistics away from the identity, as trained ones are
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    models = {}
    for precision in ("fp32", "bf16"):
        model = place_model(ZooBackbone(zoo, copy.deepcopy(net)), CPU, precision)
        models[precision] = Backbone(spec, model, weights_sha256="random", class_names=None, device=CPU,
                                     precision=precision)
    clips = small_clips(frames, 64, batch=1)
    (a, la), (b, lb) = models["fp32"](clips), models["bf16"](clips)
    assert b.shape == a.shape == (1, spec.feature_dim) and lb.shape == (1, 400)
    assert np.isfinite(b).all() and np.isfinite(lb).all()
    # Random weights drift more than trained ones; the point here is that every op runs and stays close.
    assert cosines(a, b).min() >= 0.99 and cosines(la, lb).min() >= 0.99

