"""Video Swin Transformer (Liu et al., 2022) as the ``vst`` backbone.

The network is torchvision's ``swin3d_b`` (patch 2x4x4, window 8x7x7, embed
128, depths 2-2-18-2, heads 4-8-16-32), which computes exactly what the
official ``SwinTransformer3D`` of the Video-Swin-Transformer repository
computes. Only the parameter names differ, so the official checkpoint loads
after a renaming:

==========================================  =======================================
official (mmcv ``state_dict``)              torchvision ``SwinTransformer3d``
==========================================  =======================================
``backbone.patch_embed.{proj,norm}.*``      ``patch_embed.{proj,norm}.*``
``backbone.layers.i.blocks.j.*``            ``features.{2i}.j.*``
``  … .mlp.fc1.*`` / ``… .mlp.fc2.*``       ``… .mlp.0.*`` / ``… .mlp.3.*``
``backbone.layers.i.downsample.*``          ``features.{2i+1}.*``
``backbone.norm.*``                         ``norm.*``
``cls_head.fc_cls.*``                       ``head.*``
==========================================  =======================================

Every official tensor has a counterpart, including the
``attn.relative_position_index`` buffers: both implementations store them, and
the converter checks that each equals the index torchvision computes for the
window, since the bias tables are only meaningful with that exact indexing.
Anything missing, left over, or of the wrong shape is refused by name.

The features are the published AQA ones: the (B, 1024, T/2, H/32, W/32) map
after the final LayerNorm — (B, 1024, 16, 7, 7) for a 32x224x224 clip —
adaptive-average-pooled to 1024. The logits are the checkpoint's classifier
(mmaction's I3DHead: the same pooling, then one linear layer).
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.video import SwinTransformer3d, swin3d_b
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

from aqa_cli.backbones import BackboneSpec, register_backbones
from aqa_cli.errors import WeightsError
from aqa_cli.recipes import GDLT_RECIPE
from aqa_cli.weights import WeightsSpec, guess_architecture, load_torch_checkpoint, register_weights

__all__ = [
    "SwinConfig",
    "SWIN_B",
    "VSTOutput",
    "VideoSwin",
    "build_swin3d",
    "FusedWindowAttention3d",
    "use_fused_attention",
    "torchvision_key",
    "state_dict_from_official",
    "check_state_dict",
    "load_torch_checkpoint",
    "detect_format",
    "convert_checkpoint",
]


@dataclass(frozen=True)
class SwinConfig:
    """The hyper-parameters that decide a Video Swin state dict's keys and shapes."""

    patch_size: tuple[int, int, int] = (2, 4, 4)
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: tuple[int, int, int] = (8, 7, 7)
    num_classes: int = 600

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SwinConfig:
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# Swin-B as in the official Kinetics-600 config (swin_base_patch244_window877_kinetics600_22k.py).
SWIN_B = SwinConfig()


def build_swin3d(config: SwinConfig = SWIN_B) -> SwinTransformer3d:
    """torchvision's SwinTransformer3d for ``config`` (randomly initialised).

    Swin-B is built by torchvision's own ``swin3d_b``; other configurations
    (small ones for tests) by the same class with the same defaults.
    """
    with warnings.catch_warnings():
        # A checkpoint without a classifier gets one of no classes, whose initialisation torch calls a no-op.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return _build_swin3d(config)


def _build_swin3d(config: SwinConfig) -> SwinTransformer3d:
    if replace(config, num_classes=SWIN_B.num_classes) == SWIN_B:
        return swin3d_b(weights=None, num_classes=config.num_classes)
    return SwinTransformer3d(
        patch_size=list(config.patch_size),
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=list(config.window_size),
        stochastic_depth_prob=0.1,
        num_classes=config.num_classes,
    )


# ------------------------------------------------------------------------------------- the fused attention

Size3 = tuple[int, int, int]


def _window_and_shift(size: Size3, window: list[int], shift: list[int]) -> tuple[Size3, Size3]:
    # torchvision's rule (and the official model's get_window_size): an axis no longer than the window
    # is one window, and is not shifted.
    w = tuple(size[i] if size[i] <= window[i] else window[i] for i in range(3))
    s = tuple(0 if size[i] <= window[i] else shift[i] for i in range(3))
    return w, s  # type: ignore[return-value]


def _region_labels(length: int, window: int, shift: int) -> torch.Tensor:
    """Which of the shifted image's regions each position of one axis belongs to (torchvision's slices)."""
    label = torch.zeros(length, dtype=torch.int64)
    if shift:
        label[length - window:length - shift] = 1
        label[length - shift:] = 2
    return label


@functools.lru_cache(maxsize=64)
def _window_layout(padded: Size3, window: Size3, shift: Size3, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For one padded token grid, window and shift: (gather, scatter, shift mask or None).

    ``gather`` lists, window by window and token by token, the flat grid position each window token
    reads after the cyclic shift: one index_select does torchvision's roll, view and permute copy.
    ``scatter`` is its inverse. The shift mask [nW, N, N] is -100 between tokens of different regions
    (torchvision's and the official value), 0 elsewhere; built once here, not per forward.
    """
    (tp, hp, wp), (wd, wh, ww) = padded, window
    grid = torch.arange(tp * hp * wp).view(tp, hp, wp)
    if any(shift):
        grid = torch.roll(grid, shifts=tuple(-s for s in shift), dims=(0, 1, 2))
    windows = grid.view(tp // wd, wd, hp // wh, wh, wp // ww, ww).permute(0, 2, 4, 1, 3, 5).reshape(-1)
    gather = windows.to(device)
    scatter = torch.argsort(windows).to(device)
    if not any(shift):
        return gather, scatter, None
    labels = [_region_labels(n, w, s) for n, w, s in zip(padded, window, shift)]
    region = (labels[0].view(-1, 1, 1) * 9 + labels[1].view(1, -1, 1) * 3 + labels[2].view(1, 1, -1))
    region = region.view(tp // wd, wd, hp // wh, wh, wp // ww, ww).permute(0, 2, 4, 1, 3, 5)
    region = region.reshape(-1, wd * wh * ww)
    mask = (region.unsqueeze(1) != region.unsqueeze(2)).to(torch.float32) * -100.0
    return gather, scatter, mask.to(device)


class FusedWindowAttention3d(ShiftedWindowAttention3d):
    """torchvision's (shifted) window attention, computed by ``F.scaled_dot_product_attention``.

    Same parameters and buffers, so the same state dict; the same arithmetic up to float rounding
    (tested against torchvision). Two things change. The relative-position bias and the shift mask
    are folded into one float mask per (padded input size, shift, dtype, device), built once and
    kept, where torchvision rebuilds the mask with a Python loop and adds both to a materialised
    [windows, heads, N, N] score tensor at every forward; the fused kernel never materialises it.
    And the roll, pad and window partition are one index_select each way.
    """

    def _reset_mask_cache(self) -> None:
        self._masks: dict[tuple, torch.Tensor] = {}
        self.mask_builds = 0  # how many times a mask was built (the test of the cache reads it)

    def _attention_mask(self, padded: Size3, window: Size3, shift: Size3, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
        """[nW or 1, heads, N, N]: bias + shift mask, cached unless the bias table is being trained."""
        table = self.relative_position_bias_table
        trainable = torch.is_grad_enabled() and table.requires_grad
        # The table's identity and version are in the key, so loading or converting weights rebuilds it.
        key = (padded, window, shift, dtype, device, table.data_ptr(), table._version)
        if not trainable and key in self._masks:
            return self._masks[key]
        bias = self.get_relative_position_bias(list(window))  # [1, heads, N, N]
        shift_mask = _window_layout(padded, window, shift, device)[2]
        mask = bias if shift_mask is None else bias + shift_mask.unsqueeze(1).to(bias.dtype)
        mask = mask.to(dtype).contiguous()
        if not trainable:
            self._masks = {key: mask, **{k: v for k, v in self._masks.items() if k[:5] != key[:5]}}
            self.mask_builds += 1
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        window, shift = _window_and_shift((t, h, w), self.window_size, self.shift_size)
        pad = [(window[i] - (t, h, w)[i] % window[i]) % window[i] for i in range(3)]
        if any(pad):
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        padded = (t + pad[0], h + pad[1], w + pad[2])
        gather, scatter, _ = _window_layout(padded, window, shift, x.device)
        mask = self._attention_mask(padded, window, shift, x.dtype, x.device)
        n = window[0] * window[1] * window[2]
        heads = self.num_heads
        windows = x.reshape(b, -1, c).index_select(1, gather)  # [B, nW*N, C], window-major
        qkv = F.linear(windows, self.qkv.weight, self.qkv.bias).view(b, -1, n, 3, heads, c // heads)
        p = self.attention_dropout if self.training else 0.0
        out = []
        for i in range(b):  # one clip per call: the cached mask is [nW, heads, N, N], not repeated per clip
            q, k, v = qkv[i].permute(2, 0, 3, 1, 4).unbind(0)  # [nW, heads, N, head_dim] each
            out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p))
        y = (torch.stack(out) if b > 1 else out[0].unsqueeze(0)).transpose(2, 3).reshape(b, -1, c)  # [B, nW*N, C]
        y = F.dropout(F.linear(y, self.proj.weight, self.proj.bias), p=self.dropout, training=self.training)
        y = y.index_select(1, scatter).view(b, *padded, c)
        if any(pad):
            y = y[:, :t, :h, :w].contiguous()
        return y


def use_fused_attention(net: nn.Module) -> nn.Module:
    """Switch every torchvision window attention of ``net`` to :class:`FusedWindowAttention3d`, in place."""
    for module in net.modules():
        if type(module) is ShiftedWindowAttention3d:
            module.__class__ = FusedWindowAttention3d
            module._reset_mask_cache()
    return net


class VSTOutput(NamedTuple):
    features: torch.Tensor
    """[B, 1024] the final-LayerNorm map, adaptive-average-pooled."""
    logits: torch.Tensor | None
    """[B, num_classes] the classifier head applied to those features (None without a classifier)."""


class VideoSwin(nn.Module):
    """torchvision's Swin3D with the outputs the Backbone contract asks for.

    Input: float [B, 3, T, H, W] normalised as the recipe says. Mirrors
    ``SwinTransformer3d.forward`` (patch_embed, pos_drop, features, norm,
    permute, avgpool, flatten, head) but keeps the pooled features too.
    """

    def __init__(self, net: SwinTransformer3d) -> None:
        super().__init__()
        self.net = net

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T/2, H/32, W/32] after the final LayerNorm (channels first, like the official backbone)."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"expected input [B, 3, T, H, W], got {tuple(x.shape)}")
        net = self.net
        x = net.features(net.pos_drop(net.patch_embed(x)))  # B T H W C
        return net.norm(x).permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor) -> VSTOutput:
        # Pooled in float32 whatever the model's dtype: a bf16 sum of 784 positions would lose digits.
        features = torch.flatten(self.net.avgpool(self.feature_map(x).float()), 1)
        # A checkpoint saved without its classifier (a backbone only) has a head of no classes: no logits.
        logits = (self.net.head(features.to(self.net.head.weight.dtype)) if self.net.head.out_features else None)
        return VSTOutput(features=features, logits=logits)


# ------------------------------------------------------------------------------------------------ key mapping

# The only renamings inside a block: the MLP is a named module officially, a Sequential in torchvision
# (Linear, GELU, Dropout, Linear, Dropout).
_BLOCK_RENAMES = {"mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.3."}
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")


def torchvision_key(key: str) -> str | None:
    """The torchvision name of an official (mmcv) key, or None when it has no counterpart."""
    if key.startswith("cls_head.fc_cls."):
        return "head." + key[len("cls_head.fc_cls."):]
    if not key.startswith("backbone."):
        return None
    key = key[len("backbone."):]
    if key.startswith(("patch_embed.", "norm.")):
        return key
    if m := _BLOCK.match(key):
        stage, block, rest = int(m[1]), m[2], m[3]
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
        return f"features.{2 * stage}.{block}.{rest}"
    if m := _DOWNSAMPLE.match(key):
        return f"features.{2 * int(m[1]) + 1}.{m[2]}"
    return None


def official_key(key: str) -> str:
    """The inverse of :func:`torchvision_key` (used to name keys in messages, and by tests)."""
    if key.startswith("head."):
        return "cls_head.fc_cls." + key[len("head."):]
    m = re.match(r"^features\.(\d+)\.(.+)$", key)
    if not m:
        return "backbone." + key
    index, rest = int(m[1]), m[2]
    if index % 2:
        return f"backbone.layers.{index // 2}.downsample.{rest}"
    block, rest = rest.split(".", 1)
    for old, new in _BLOCK_RENAMES.items():
        if rest.startswith(new):
            rest = old + rest[len(new):]
    return f"backbone.layers.{index // 2}.blocks.{block}.{rest}"


def state_dict_from_official(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Rename an official state dict to torchvision's names; returns (renamed, keys with no counterpart)."""
    renamed: dict[str, Any] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        new = torchvision_key(key)
        if new is None:
            unexpected.append(key)
        else:
            renamed[new] = value
    return renamed, unexpected


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _expected_index(window: tuple[int, int, int]) -> torch.Tensor:
    attn = ShiftedWindowAttention3d(dim=8, window_size=list(window), shift_size=[0, 0, 0], num_heads=1)
    return attn.relative_position_index


def check_state_dict(tensors: Mapping[str, Any], config: SwinConfig, *,
                     naming: Callable[[str], str] = lambda k: k) -> dict[str, torch.Tensor]:
    """Check a torchvision-named state dict against ``config``; ValueError names every problem.

    ``naming`` maps a torchvision key to the name the user knows it by (the
    official one when the file was an official checkpoint).
    """
    with torch.device("meta"):
        expected = build_swin3d(config).state_dict()
    missing = [naming(k) for k in expected if k not in tensors]
    unexpected = [naming(k) for k in tensors if k not in expected]
    not_tensor = [naming(k) for k, v in tensors.items() if k in expected and not isinstance(v, torch.Tensor)]
    bad_shape = [f"{naming(k)} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if isinstance(tensors.get(k), torch.Tensor) and tuple(tensors[k].shape) != tuple(v.shape)]
    problems = [f"{label}: {_names(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("not tensors", not_tensor),
                 ("shape (checkpoint vs Swin3D)", bad_shape)) if keys]
    if problems:
        raise ValueError(f"not a {_describe(config)} checkpoint; " + "; ".join(problems))
    index = _expected_index(config.window_size)
    wrong_index = [naming(k) for k in expected if k.endswith("relative_position_index")
                   and not torch.equal(tensors[k].to(torch.int64), index)]
    if wrong_index:
        raise ValueError(f"relative_position_index differs from the {config.window_size} window's: "
                         f"{_names(wrong_index)}")
    out = {}
    for k, v in expected.items():
        t = tensors[k]
        out[k] = t.to(v.dtype).contiguous()  # fp16 copies are widened; the index stays int64
    return out


def _describe(config: SwinConfig) -> str:
    name = "Swin-B" if replace(config, num_classes=SWIN_B.num_classes) == SWIN_B else "Video Swin"
    return (f"{name} (embed {config.embed_dim}, depths {'-'.join(map(str, config.depths))}, "
            f"{config.num_classes} classes)")


# ---------------------------------------------------------------------------------------- reading checkpoints

def _detect(obj: Any) -> tuple[str, Mapping[str, Any]]:
    """(format, state dict) of a loaded checkpoint: "mmcv" (official names) or "torchvision"."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"holds a {type(obj).__name__}, not a dict of tensors")
    state = obj["state_dict"] if "state_dict" in obj else obj
    if not isinstance(state, Mapping):
        raise ValueError("its state_dict is not a dict of tensors")
    keys = [k for k in state if isinstance(k, str)]
    if keys and all(k.startswith("module.") for k in keys):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
        keys = list(state)
    seen = guess_architecture(obj)
    if seen and seen.family != "swin3d":
        raise ValueError(f"this is {seen.what}, not a Video Swin checkpoint ({_names(keys, 3)})"
                         + (f"; use --backbone {seen.backbone}" if seen.backbone else ""))
    if any(k.startswith(("backbone.", "cls_head.")) for k in keys):
        return "mmcv", state
    if any(k.startswith(("features.", "patch_embed.")) for k in keys):
        return "torchvision", state
    raise ValueError(f"neither official (backbone.*) nor torchvision (features.*) key names: {_names(keys, 4)}")


def detect_format(path: Path) -> str:
    """"mmcv" or "torchvision", read with ``weights_only`` (nothing in the file is run)."""
    try:
        return _detect(load_torch_checkpoint(path))[0]
    except ValueError as exc:
        raise WeightsError(str(exc), path=path, fix="pass a Video Swin checkpoint (official or torchvision)") from None


def convert_checkpoint(path: Path, fmt: str = "auto", *, config: SwinConfig = SWIN_B,
                       classes: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An official mmcv checkpoint or a torchvision state dict → torchvision's state dict and metadata."""
    obj = load_torch_checkpoint(path)
    try:
        detected, renamed = _torchvision_state(obj, fmt)
        found = _class_count(renamed)
        if found is not None and found != config.num_classes:
            raise ValueError(f"its classifier has {found} classes but these weights are a "
                             f"{config.num_classes}-class model (a checkpoint of your own goes by path: "
                             "--weights FILE / --backbone-weights FILE)")
        tensors = check_state_dict(renamed, config, naming=official_key if detected == "mmcv" else (lambda k: k))
    except ValueError as exc:
        raise WeightsError(str(exc), path=path, fix="this is not the checkpoint for these weights") from None
    extra = {"source_format": detected, "vst_config": config.to_json(), "feature_dim": str(config.feature_dim),
             "num_classes": str(config.num_classes)}
    if classes is not None:
        extra["classes"] = json.dumps(classes)
    return tensors, extra


def _torchvision_state(obj: Any, fmt: str = "auto") -> tuple[str, dict[str, Any]]:
    """(detected format, the state dict under torchvision's names) of a loaded checkpoint; ValueError if
    it is not a Video Swin checkpoint, or not of the format ``fmt`` the user named."""
    detected, state = _detect(obj)
    if fmt not in ("auto", detected):
        raise ValueError(f"looks like a {detected} checkpoint, not {fmt}")
    if detected != "mmcv":
        return detected, dict(state)
    renamed, unexpected = state_dict_from_official(state)
    if unexpected:
        raise ValueError(f"keys with no Swin3D counterpart: {_names(unexpected)}")
    return detected, renamed


def _class_count(state: Mapping[str, Any]) -> int | None:
    """The classifier's class count (None without a classifier); its weight and bias must agree."""
    weight, bias = state.get("head.weight"), state.get("head.bias")
    if weight is None and bias is None:
        return None
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor) or weight.dim() != 2:
        raise ValueError("the classifier (cls_head.fc_cls / head) needs a 2-d weight and a bias")
    if weight.shape[0] != bias.shape[0]:
        raise ValueError(f"wrong class count: the classifier's weight has {weight.shape[0]} classes, "
                         f"its bias {bias.shape[0]}")
    return int(weight.shape[0])


def infer_config(state: Mapping[str, Any], num_classes: int) -> SwinConfig:
    """The Video Swin hyper-parameters of a torchvision-named state dict, read from its shapes.

    A checkpoint of one's own may be a Swin-T, -S, -B or -L with any window and patch: the patch
    embedding's kernel gives the patch and the embedding width, the blocks per stage the depths, each
    stage's relative-position table its heads, and the table and index sizes the window
    (N = wd·wh·ww positions, (2wd-1)(2wh-1)(2ww-1) table rows, with a square spatial window as in
    every published config). Whatever this gets wrong, :func:`check_state_dict` then names.
    """
    proj = state.get("patch_embed.proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.dim() != 5:
        raise ValueError("missing: backbone.patch_embed.proj.weight (a Video Swin's patch embedding)")
    depths, heads, table, positions = [], [], None, None
    stage = 0
    while any(isinstance(k, str) and k.startswith(f"features.{2 * stage}.") for k in state):
        blocks = {int(k.split(".")[2]) for k in state if isinstance(k, str) and k.startswith(f"features.{2 * stage}.")
                  and k.split(".")[2].isdigit()}
        bias_table = state.get(f"features.{2 * stage}.0.attn.relative_position_bias_table")
        if not blocks or not isinstance(bias_table, torch.Tensor) or bias_table.dim() != 2:
            raise ValueError(f"stage {stage} has no attention blocks with a relative position bias table")
        depths.append(max(blocks) + 1)
        heads.append(int(bias_table.shape[1]))
        table = int(bias_table.shape[0])
        index = state.get(f"features.{2 * stage}.0.attn.relative_position_index")
        positions = int(index.shape[0]) if isinstance(index, torch.Tensor) and index.dim() == 2 else positions
        stage += 1
    if not depths:
        raise ValueError("no Video Swin stages (backbone.layers.*)")
    window = None
    for wd in range(1, 65):
        for wh in range(1, 65):
            if (2 * wd - 1) * (2 * wh - 1) ** 2 == table and (positions is None or wd * wh * wh == positions):
                window = (wd, wh, wh)
                break
        if window:
            break
    if window is None:
        raise ValueError(f"no window fits a relative position table of {table} rows")
    return SwinConfig(patch_size=tuple(int(n) for n in proj.shape[2:]), embed_dim=int(proj.shape[0]),
                      depths=tuple(depths), num_heads=tuple(heads), window_size=window, num_classes=num_classes)


def convert_user_checkpoint(path: Path, fmt: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A Video Swin checkpoint of one's own (official mmcv layout or torchvision's), any size and class count.

    The configuration is read from the tensors' shapes (:func:`infer_config`); a checkpoint saved
    without its classifier gets a classifier of no classes (features, no logits). A 400-class one is
    given torchvision's Kinetics-400 names (an assumption: the file does not say what it was trained on).
    """
    from torchvision.models.video import Swin3D_B_Weights

    obj = load_torch_checkpoint(path)
    try:
        detected, renamed = _torchvision_state(obj, fmt)
        num_classes = _class_count(renamed)
        config = infer_config(renamed, num_classes or 0)
        if num_classes is None:
            renamed["head.weight"] = torch.zeros(0, config.feature_dim)
            renamed["head.bias"] = torch.zeros(0)
        tensors = check_state_dict(renamed, config, naming=official_key if detected == "mmcv" else (lambda k: k))
    except ValueError as exc:
        raise WeightsError(str(exc), path=path, fix="pass a Video Swin checkpoint (official mmcv layout or "
                                                    "torchvision's), or choose the --backbone it belongs to") from None
    extra = {"source_format": detected, "vst_config": config.to_json(), "feature_dim": str(config.feature_dim),
             "num_classes": str(config.num_classes)}
    if config.num_classes == 400:
        extra["classes"] = json.dumps(list(Swin3D_B_Weights.KINETICS400_V1.meta["categories"]))
        extra["classes_source"] = "torchvision's Kinetics-400 list (assumed: a 400-class checkpoint given by path)"
    return tensors, extra


def _build(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> nn.Module:
    config = SwinConfig.from_json(metadata["vst_config"]) if metadata and "vst_config" in metadata else \
        replace(SWIN_B, num_classes=int(tensors["head.weight"].shape[0]))
    net = build_swin3d(config)
    net.load_state_dict(tensors, strict=True)
    return VideoSwin(use_fused_attention(net)).eval()


# ------------------------------------------------------------------------------------------- weights and recipe

OFFICIAL_URL = ("https://github.com/SwinTransformer/storage/releases/download/v1.0.4/"
                "swin_base_patch244_window877_kinetics600_22k.pth")
# DeepMind's Kinetics-600 label map (kinetics-i3d, data/label_map_600.txt): the 600 class names sorted,
# which is also the logit order of mmaction's Kinetics-600 annotation lists the official model was trained on.
K600_LABELS_URL = "https://raw.githubusercontent.com/deepmind/kinetics-i3d/master/data/label_map_600.txt"
K600_LABELS_SHA256 = "8dfca4202520ea8291ce0242ef33b006d0a0772b409663c090a2876bc1978dcf"


def _convert_official(path: Path, fmt: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return convert_checkpoint(path, fmt, config=SWIN_B)


def _torchvision_k400_converter(path: Path, fmt: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from torchvision.models.video import Swin3D_B_Weights

    # torchvision's Kinetics-400 class names, in its logit order, shipped with torchvision itself.
    classes = list(Swin3D_B_Weights.KINETICS400_V1.meta["categories"])
    return convert_checkpoint(path, fmt, config=replace(SWIN_B, num_classes=400), classes=classes)


VST_K600 = WeightsSpec(
    name="vst-k600",
    kind="backbone",
    architecture="swin3d_b",
    description="Video Swin-B, ImageNet-22K then Kinetics-600 (official release v1.0.4): the published AQA features",
    source=OFFICIAL_URL,
    # The release publishes no checksum. The size is pinned: 382,519,424 bytes of tensors (88,253,984 float32
    # parameters with the 600-class head, 24 int64 relative_position_index buffers of 392x392) plus the
    # container, as reported for a download of this URL; the sha256 is trusted on first use.
    source_sha256="",
    source_size=382_579_368,
    convert=_convert_official,
    url=OFFICIAL_URL,
    formats=("mmcv", "torchvision"),
    detect=detect_format,
    labels_url=K600_LABELS_URL,
    labels_sha256=K600_LABELS_SHA256,
    convert_user=convert_user_checkpoint,
)

def _torchvision_spec(name: str, description: str, url: str) -> WeightsSpec:
    # torchvision names its files by the first 8 hex digits of their sha256: the pin it publishes.
    return WeightsSpec(name=name, kind="backbone", architecture="swin3d_b", description=description, source=url,
                       source_sha256=url.rsplit("-", 1)[1].removesuffix(".pth"), convert=_torchvision_k400_converter,
                       url=url, formats=("torchvision",), detect=detect_format,
                       convert_user=convert_user_checkpoint)


SWIN3D_B_K400 = _torchvision_spec(
    "swin3d-b-k400", "torchvision Swin3D_B_Weights.KINETICS400_V1 (ImageNet-1K then Kinetics-400, ported by torchvision)",
    "https://download.pytorch.org/models/swin3d_b_1k-24f7c7c6.pth")
SWIN3D_B_K400_IN22K = _torchvision_spec(
    "swin3d-b-k400-in22k", "torchvision Swin3D_B_Weights.KINETICS400_IMAGENET22K_V1 (ImageNet-22K then Kinetics-400)",
    "https://download.pytorch.org/models/swin3d_b_22k-7c6ae6fa.pth")

WEIGHTS = (VST_K600, SWIN3D_B_K400, SWIN3D_B_K400_IN22K)

BACKBONE = BackboneSpec(
    name="vst",
    description="Video Swin-B (Kinetics-600): final-LayerNorm map pooled to 1024-d per clip, GDLT recipe",
    weights=VST_K600.name,
    recipe=GDLT_RECIPE,
    feature_dim=1024,
    build=_build,
    # bench/bench_precision.py, random Swin-B weights, real bf16: per-clip cosine >= 0.99998 (bound 0.999).
    bf16_within_bounds=True,
)

register_backbones(BACKBONE)
register_weights(*WEIGHTS)
