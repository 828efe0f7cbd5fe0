"""Clip segmentation: from a video's frame timestamps to fixed-length clips.

Two steps, both pure index arithmetic so they can be tested without decoding:

1. *Resampling* builds the timeline the recipe asks for (for example 25 fps).
   Timeline frame ``i`` shows the source frame on screen at time ``i / fps``,
   found from the real timestamps, so variable-frame-rate video is handled too.
2. *Segmentation* cuts the timeline into clips of ``clip_len`` frames every
   ``stride`` frames. The published long-term AQA recipe trims the leftover
   frames equally from head and tail (``trim``); ``pad`` instead keeps every
   frame and repeats the last one to fill the final clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from aqa_cli.errors import VideoError

LEFTOVER_POLICIES = ("trim", "pad")


@dataclass(frozen=True)
class Clip:
    """One clip. Frame ranges are on the timeline; ``end`` values are exclusive."""

    index: int
    frame_start: int
    frame_end: int
    source_indices: tuple[int, ...]
    start_s: float
    end_s: float
    padded: int = 0

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "frame_start": self.frame_start,
            "frame_end": self.frame_end,
            "source_frame_start": self.source_indices[0],
            "source_frame_end": self.source_indices[-1] + 1,
            "start_s": round(self.start_s, 6),
            "end_s": round(self.end_s, 6),
            "padded": self.padded,
        }


@dataclass(frozen=True)
class ClipPlan:
    clips: list[Clip]
    fps: float
    source_fps: float
    source_frames: int
    timeline_frames: int
    resampled: bool
    trimmed_head: int = 0
    trimmed_tail: int = 0
    warnings: list[str] = field(default_factory=list)

    def needed_source_frames(self) -> list[int]:
        return sorted({i for clip in self.clips for i in clip.source_indices})

    def to_dict(self) -> dict:
        return {
            "fps": self.fps,
            "source_fps": self.source_fps,
            "source_frames": self.source_frames,
            "timeline_frames": self.timeline_frames,
            "resampled": self.resampled,
            "trimmed_head": self.trimmed_head,
            "trimmed_tail": self.trimmed_tail,
            "warnings": list(self.warnings),
        }


def resample(timestamps: np.ndarray, source_fps: float, target_fps: float | None) -> tuple[np.ndarray, float, bool]:
    """Map timeline frames to source frames.

    Returns ``(source_index_per_timeline_frame, timeline_fps, resampled)``. With no
    target, or a target within 0.1% of the source rate, every source frame is
    kept as it is: resampling would only add jitter.
    """
    n = int(len(timestamps))
    if target_fps is None or n == 0 or abs(source_fps - target_fps) <= 1e-3 * target_fps:
        return np.arange(n, dtype=np.int64), float(target_fps or source_fps), False
    duration = float(timestamps[-1]) + 1.0 / source_fps
    n_out = max(1, int(math.floor(duration * target_fps + 1e-6)))
    times = np.arange(n_out, dtype=np.float64) / target_fps
    # Half a millisecond of slack absorbs timestamps rounded by the container's time base.
    idx = np.searchsorted(timestamps, times + 5e-4, side="right") - 1
    return np.clip(idx, 0, n - 1).astype(np.int64), float(target_fps), True


def plan_clips(
    timestamps: np.ndarray,
    source_fps: float,
    *,
    clip_len: int = 32,
    stride: int | None = None,
    leftover: str = "trim",
    target_fps: float | None = None,
    path: str | None = None,
) -> ClipPlan:
    """Cut a video, given its frame timestamps, into clips.

    Raises :class:`VideoError` for a video with no frames. A video shorter than
    one clip becomes one padded clip, with a warning in ``ClipPlan.warnings``.
    """
    if clip_len < 1:
        raise ValueError("clip_len must be at least 1")
    stride = clip_len if stride is None else stride
    if stride < 1:
        raise ValueError("stride must be at least 1")
    if leftover not in LEFTOVER_POLICIES:
        raise ValueError(f"leftover must be one of {LEFTOVER_POLICIES}, not {leftover!r}")
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if timestamps.size == 0:
        raise VideoError("has zero decodable frames", path=path, fix="re-encode or re-download the video")

    source_of, fps, resampled = resample(timestamps, source_fps, target_fps)
    times = np.arange(len(source_of)) / fps if resampled else timestamps
    n = len(source_of)
    warnings: list[str] = []
    head = tail = 0

    if n < clip_len:
        warnings.append(
            f"only {n} frames, fewer than one {clip_len}-frame clip: padded by repeating the last frame"
        )
        starts = [0]
    elif leftover == "trim":
        count = (n - clip_len) // stride + 1
        span = (count - 1) * stride + clip_len
        head = (n - span) // 2
        tail = n - span - head
        starts = [head + k * stride for k in range(count)]
    else:
        count = math.ceil((n - clip_len) / stride) + 1
        starts = [k * stride for k in range(count)]

    clips = []
    for k, start in enumerate(starts):
        end = min(start + clip_len, n)
        real = list(source_of[start:end])
        pad = clip_len - len(real)
        clips.append(
            Clip(
                index=k,
                frame_start=start,
                frame_end=end,
                source_indices=tuple(int(i) for i in real + [real[-1]] * pad),
                start_s=float(times[start]),
                end_s=float(times[end - 1] + 1.0 / fps),
                padded=pad,
            )
        )
    return ClipPlan(
        clips=clips,
        fps=fps,
        source_fps=float(source_fps),
        source_frames=int(timestamps.size),
        timeline_frames=n,
        resampled=resampled,
        trimmed_head=head,
        trimmed_tail=tail,
        warnings=warnings,
    )
