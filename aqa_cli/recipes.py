"""Feature recipes: everything that decides which pixels a backbone sees.

A feature is only comparable with another made by the same recipe, so the
recipe is one frozen object, written in full into every feature sidecar and
every head checkpoint's feature contract.

Geometry is applied per decoded chunk and the frames stay uint8 until a clip
is handed to the backbone, so memory per buffered frame is that of the crop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from aqa_cli.clips import LEFTOVER_POLICIES


@dataclass(frozen=True)
class Recipe:
    """How frames become a backbone input. Sizes are (height, width)."""

    name: str
    fps: float | None
    clip_len: int = 32
    stride: int = 32
    leftover: str = "trim"
    resize_short: int = 256
    # None keeps the whole resized frame: a pose estimator must see the person wherever they are, and the
    # frames of one video share one size, so its clips still stack.
    crop: tuple[int, int] | None = (224, 224)
    # A second resize after the crop; the published VST recipe squashes 224x300 to 224x224.
    final_size: tuple[int, int] | None = None
    # Applied to RGB values scaled to [0, 1].
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    antialias: bool = True
    # A clip takes every ``sampling_rate``-th frame of the ``fps`` timeline (the pytorchvideo zoo's
    # "frame length x sample rate": X3D-M 16x5 at 30 fps spans 80 timeline frames). Frame i of the
    # sampled timeline shows what is on screen at i * sampling_rate / fps s; clip_len and stride count
    # sampled frames.
    sampling_rate: int = 1
    # SlowFast's two pathways: the fast one sees the whole clip, the slow one clip_len // alpha frames of it.
    slowfast_alpha: int | None = None

    # Fields left out of to_dict() at their default, so that the recipes written before they existed (in
    # sidecars, cache keys and head contracts) still read as the same recipe.
    _OPTIONAL = {"sampling_rate": 1, "slowfast_alpha": None}

    def __post_init__(self) -> None:
        if self.leftover not in LEFTOVER_POLICIES:
            raise ValueError(f"leftover must be one of {LEFTOVER_POLICIES}")
        if self.clip_len < 1 or self.stride < 1 or self.sampling_rate < 1:
            raise ValueError("clip_len, stride and sampling_rate must be positive")

    @property
    def timeline_fps(self) -> float | None:
        """The rate of the frames a clip is cut from: fps / sampling_rate (None: the source's own rate)."""
        return None if self.fps is None else self.fps / self.sampling_rate

    @property
    def input_size(self) -> tuple[int, int]:
        if self.final_size is None and self.crop is None:
            raise ValueError(f"recipe {self.name} keeps each video's own frame size")
        return self.final_size or self.crop

    def replace(self, **changes: object) -> Recipe:
        """A copy with some fields changed; ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key, default in self._OPTIONAL.items():
            if d[key] == default:
                del d[key]
        for key in ("crop", "final_size", "mean", "std"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        d = dict(d)
        for key in ("crop", "final_size", "mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the short-side resize: the short side becomes ``resize_short``,
        the long side ``floor(resize_short * long / short)`` (torchvision's and mmcv's rounding)."""
        short, long = min(height, width), max(height, width)
        new_long = int(self.resize_short * long / short)
        return (self.resize_short, new_long) if height <= width else (new_long, self.resize_short)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of the centre crop in a (height, width) frame.

        Offsets are ``round((size - crop) / 2)``. A frame smaller than the crop
        (a portrait video under a landscape crop) is padded with black on both
        sides instead; the offsets are then negative.
        """
        if self.crop is None:
            return 0, 0, height, width
        ch, cw = self.crop
        return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), ch, cw

    def transform_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB [n, H, W, 3] → uint8 RGB [n, h, w, 3] at the backbone's input size.

        Steps, in order: short-side resize (:meth:`resized_size`), centre crop
        (:meth:`crop_box`), then the optional second resize to ``final_size``.
        """
        # Imported here: torchvision takes about 2 s to import, which commands that never decode (train, evaluate,
        # weights, score from features) need not pay.
        from torchvision.transforms.v2 import functional as TF

        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        mode = TF.InterpolationMode(self.interpolation)
        size = self.resized_size(*x.shape[-2:])
        if tuple(x.shape[-2:]) != size:  # skip a needless interpolation pass (it would be an identity)
            x = TF.resize(x, list(size), interpolation=mode, antialias=self.antialias)
        if self.crop is not None:
            x = TF.center_crop(x, list(self.crop))
        if self.final_size is not None and (self.crop is None or tuple(self.final_size) != tuple(self.crop)):
            x = TF.resize(x, list(self.final_size), interpolation=mode, antialias=self.antialias)
        return x.permute(0, 2, 3, 1).contiguous().numpy()

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, h, w, 3] → float32 [B, 3, T, h, w], normalised."""
        # Contiguous in the new order: a float copy of the permuted view would keep its strides (a
        # channels-last-like layout), on which I3D ran up to 25% slower on the CPU (README, Benchmarks).
        x = clips.permute(0, 4, 1, 2, 3).to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
        return x.sub_(mean).div_(std)


# DeepMind's Kinetics preprocessing: 25 fps, short side 256, centre crop 224, values in [-1, 1].
I3D_RECIPE = Recipe(name="i3d-deepmind", fps=25.0)

# The Video Swin-B (Kinetics-600) features of the published long-term AQA work (GDLT, CVPR 2022, and the
# heads built on its features): 25 fps, non-overlapping 32-frame clips with the leftover trimmed equally from
# head and tail; short side 256, centre crop 224 high x 300 wide, then squashed to 224x224 (the aspect ratio
# is not kept); ImageNet mean/std on the 0-255 scale, written here on the 0-1 scale.
GDLT_RECIPE = Recipe(
    name="gdlt",
    fps=25.0,
    clip_len=32,
    stride=32,
    leftover="trim",
    resize_short=256,
    crop=(224, 300),
    final_size=(224, 224),
    mean=(123.675 / 255, 116.28 / 255, 103.53 / 255),
    std=(58.395 / 255, 57.12 / 255, 57.375 / 255),
)

# The pose backbone (MediaPipe BlazePose): 25 fps and 32-frame clips as for I3D, so clip times line up with the
# other backbones'; short side 480 and no crop, because the person may be anywhere in the frame (BlazePose
# re-crops around the person itself, from this frame). The values are never normalised: the estimator takes
# uint8 RGB.
POSE_RECIPE = Recipe(name="pose-blazepose", fps=25.0, resize_short=480, crop=None)
