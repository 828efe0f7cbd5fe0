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
from torchvision.transforms.v2 import functional as TF

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
    crop: tuple[int, int] = (224, 224)
    # A second resize after the crop; the published VST recipe squashes 224x300 to 224x224.
    final_size: tuple[int, int] | None = None
    # Applied to RGB values scaled to [0, 1].
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    antialias: bool = True

    def __post_init__(self) -> None:
        if self.leftover not in LEFTOVER_POLICIES:
            raise ValueError(f"leftover must be one of {LEFTOVER_POLICIES}")
        if self.clip_len < 1 or self.stride < 1:
            raise ValueError("clip_len and stride must be positive")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.final_size or self.crop

    def replace(self, **changes: object) -> Recipe:
        """A copy with some fields changed; ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
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

    def transform_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB [n, H, W, 3] → uint8 RGB [n, h, w, 3] at the backbone's input size."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        mode = TF.InterpolationMode(self.interpolation)
        x = TF.resize(x, [self.resize_short], interpolation=mode, antialias=self.antialias)
        x = TF.center_crop(x, list(self.crop))
        if self.final_size is not None:
            x = TF.resize(x, list(self.final_size), interpolation=mode, antialias=self.antialias)
        return x.permute(0, 2, 3, 1).contiguous().numpy()

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 [B, T, h, w, 3] → float32 [B, 3, T, h, w], normalised."""
        x = clips.permute(0, 4, 1, 2, 3).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
        return x.sub_(mean).div_(std)


# DeepMind's Kinetics preprocessing: 25 fps, short side 256, centre crop 224, values in [-1, 1].
I3D_RECIPE = Recipe(name="i3d-deepmind", fps=25.0)
