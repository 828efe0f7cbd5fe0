"""The I3D port against DeepMind's published behaviour, with the real Kinetics-400 weights."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch

from aqa_cli.backbones.i3d import WEIGHTS, InceptionI3d, fuse_batchnorm, state_dict_from_deepmind
from aqa_cli.errors import WeightsError
from aqa_cli.extract import top_predictions, video_features
from aqa_cli.recipes import I3D_RECIPE
from aqa_cli.safe_pickle import UnsafePickleError, load_numpy_pickle
from aqa_cli.video import open_video

pytestmark = pytest.mark.slow


def whole_video_probs(backbone, path) -> np.ndarray:
    """DeepMind's protocol: every frame at the source rate as one input."""
    with open_video(path) as reader:
        frames = np.concatenate([I3D_RECIPE.transform_frames(chunk)
                                 for _, chunk in reader.iter_chunks(range(reader.info.num_frames))])
    _, logits = backbone(frames[None])
    return torch.softmax(torch.from_numpy(logits[0]), dim=0).numpy()


def test_whole_video_matches_deepminds_published_probabilities(i3d, shared):
    names = i3d.class_names
    p = whole_video_probs(i3d, shared / "videos" / "flipping_a_pancake.mkv")
    assert names[int(p.argmax())] == "flipping pancake"
    assert p.max() == pytest.approx(0.9998, abs=3e-4)
    p = whole_video_probs(i3d, shared / "videos" / "arm_wrestling.mp4")
    assert names[int(p.argmax())] == "arm wrestling" and p.max() > 0.999


@pytest.fixture(scope="module")
def arm_wrestling(i3d, shared):
    """The golden clip's features at the default batch size, computed once for the tests below."""
    return video_features(shared / "videos" / "arm_wrestling.mp4", i3d, batch_size=4)


def test_clip_pipeline_recognises_the_golden_videos(i3d, shared, arm_wrestling):
    arm = arm_wrestling
    assert arm.features.shape == (7, 1024) and arm.features.dtype == np.float32
    assert top_predictions(arm.logits, i3d.class_names)[0]["label"] == "arm wrestling"
    pancake = video_features(shared / "videos" / "flipping_a_pancake.mkv", i3d)
    assert "flipping pancake" in [p["label"] for p in top_predictions(pancake.logits, i3d.class_names)]


def test_features_are_deterministic_and_independent_of_batch_size(i3d, shared, arm_wrestling):
    path = shared / "videos" / "arm_wrestling.mp4"
    a = video_features(path, i3d, batch_size=1).features
    b = arm_wrestling.features
    assert np.allclose(a, b, atol=1e-5)
    assert np.array_equal(video_features(path, i3d, batch_size=4).features, b)


def test_class_names_are_deepminds_label_map(i3d, shared):
    labels = (shared / "data" / "kinetics" / "label_map_k400.txt").read_text().splitlines()
    assert i3d.class_names == labels


def test_checkpoint_conversion_uses_every_array_and_fills_every_tensor():
    model = InceptionI3d()
    tree = {"params": {}, "batch_stats": {}}
    # Build a DeepMind-shaped tree from a random model and convert it back.
    for key, value in model.state_dict().items():
        *scope, module, tensor = key.split(".")
        name = "/".join(scope)
        if module == "conv":
            leaf = "kernel" if tensor == "weight" else "bias"
            arr = value.numpy().transpose(2, 3, 4, 1, 0) if tensor == "weight" else value.numpy()
            tree["params"].setdefault(name, {}).setdefault("Conv_0", {})[leaf] = arr
        elif tensor == "bias":
            tree["params"].setdefault(name, {}).setdefault("BatchNorm_0", {})["bias"] = value.numpy()
        else:
            stat = "mean" if tensor == "running_mean" else "var"
            tree["batch_stats"].setdefault(name, {}).setdefault("BatchNorm_0", {})[stat] = value.numpy().reshape(
                1, 1, 1, 1, -1)
    state = state_dict_from_deepmind(tree)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    del tree["params"]["Mixed_5c/Branch_0/Conv3d_0a_1x1"]
    tree["params"]["Extra"] = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 1, 1), np.float32)}}
    with pytest.raises(ValueError, match=r"missing: \['Mixed_5c.Branch_0.Conv3d_0a_1x1.conv.weight'") as exc:
        state_dict_from_deepmind(tree)
    assert "Extra" in str(exc.value)


def test_folded_batchnorm_gives_the_same_outputs():
    torch.manual_seed(0)
    model = InceptionI3d().eval()
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(1, 3, 16, 224, 224)
    with torch.inference_mode():
        ref, fused = model(x), fuse_batchnorm(model)(x)
    assert torch.allclose(ref.features, fused.features, atol=1e-4)
    assert torch.allclose(ref.logits, fused.logits, atol=1e-4)


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/aqa-pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    evil = tmp_path / "i3d-kinetics-400.ckpt"
    evil.write_bytes(pickle.dumps({"params": _Exploit()}))
    with pytest.raises(UnsafePickleError, match="system"):
        load_numpy_pickle(evil)
    with pytest.raises(WeightsError, match="refused") as exc:
        WEIGHTS.convert(evil)
    assert "never load it" in exc.value.message


def test_numpy_only_pickles_load(tmp_path):
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps({"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}}, protocol=4))
    tree = load_numpy_pickle(path)
    assert tree["a"]["b"].shape == (2, 3)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(pickle.dumps({"a": np.zeros((100, 100), np.float32)}, protocol=4)[:2000])
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        WEIGHTS.convert(path)


def test_safetensors_metadata_records_source_and_classes(i3d):
    from aqa_cli.weights import cached_path, read_safetensors

    _, meta = read_safetensors(cached_path("i3d-kinetics400"))
    assert meta["source_sha256"] == WEIGHTS.source_sha256
    assert meta["format"] == "aqa-weights/1" and meta["architecture"] == "i3d"
    assert len(json.loads(meta["classes"])) == 400


@pytest.mark.parametrize("route", ["native", "emulated"])
def test_bf16_drift_of_the_real_weights_is_within_the_auto_bound(i3d, shared, route):
    """The bound --precision auto keeps (per-clip cosine >= 0.999), on real weights and full-size real clips.

    The native bf16 path where this CPU computes bf16 (where auto picks it); its emulation (bf16-rounded values,
    float32 arithmetic) on every CPU, since elsewhere the fallback bf16 convolution is far too slow for
    full-size clips. The real bf16 forward runs on every CPU on small clips (tests/test_bf16.py).
    """
    from aqa_cli.backbones import Backbone, native_bf16, place_model
    from aqa_cli.backbones.i3d import emulate_bf16

    if route == "native" and not native_bf16(i3d.device):
        pytest.skip("this CPU has no bf16 units, so auto never picks bf16 here; tests/test_bf16.py runs the real "
                    "bf16 forward on small clips")
    with open_video(shared / "videos" / "arm_wrestling.mp4") as reader:
        frames = np.concatenate([I3D_RECIPE.transform_frames(chunk) for _, chunk in reader.iter_chunks(range(64))])
    clips = np.stack([frames[:32], frames[32:64]])
    if route == "native":
        model, precision = place_model(copy.deepcopy(i3d.model), i3d.device, "bf16"), "bf16"
    else:
        model, precision = emulate_bf16(i3d.model), "fp32"
    bf16 = Backbone(i3d.spec, model, weights_sha256=i3d.weights_sha256, class_names=i3d.class_names,
                    device=i3d.device, precision=precision)
    (a, la), (b, lb) = i3d(clips), bf16(clips)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999
    assert (la.argmax(1) == lb.argmax(1)).all()


def test_bf16_on_the_cpu_runs_channels_last_and_agrees_with_the_default_layout():
    """Cast to bf16 on a CPU, I3D keeps its convolution weights channels-last (oneDNN's layout, faster where bf16 is
    native) and its convolutions return channels-last maps; back in fp32 it is NCDHW again. The features are the
    default layout's within bf16 rounding. Runs on any CPU (tiny input)."""
    torch.manual_seed(0)
    fp32 = fuse_batchnorm(InceptionI3d()).eval()
    default = copy.deepcopy(fp32)
    default.channels_last_bf16 = False
    last, default = copy.deepcopy(fp32).to(torch.bfloat16), default.to(torch.bfloat16)
    assert all(m.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
               for m in last.modules() if hasattr(m, "conv"))
    assert all(m.conv.weight.is_contiguous() for m in default.modules() if hasattr(m, "conv"))
    layouts = []
    last.Conv3d_2c_3x3.register_forward_hook(  # a 3x3x3 convolution (a 1x1x1 one's layouts are indistinguishable)
        lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last_3d)))
    x = torch.randn(1, 3, 8, 64, 64).to(torch.bfloat16)
    with torch.inference_mode():
        a, b = last(x).features, default(x).features
    assert layouts == [True]
    assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.999
    back = last.float()
    assert all(m.conv.weight.is_contiguous() for m in back.modules() if hasattr(m, "conv"))
