"""Synthetic videos with known content, for tests, benchmarks and samples.

:func:`write_video` encodes frames with PyAV. :func:`index_frames` draws frames
whose source index can be read back after lossy compression
(:func:`read_index`), so tests can check exactly which frame a decoder or a
resampler delivered.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    codec: str = "libx264",
    crf: int = 18,
    rotation: int | None = None,
    pts_seconds: Iterable[float] | None = None,
) -> Path:
    """Encode uint8 RGB frames [H, W, 3]. ``pts_seconds`` gives each frame's time (variable frame rate)."""
    import av

    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    times = iter(pts_seconds) if pts_seconds is not None else None
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                h, w = frame.shape[:2]
                stream = container.add_stream(codec, rate=rate)
                if codec == "gif":
                    stream.pix_fmt = "rgb8"
                else:
                    # 4:2:0 chroma needs even sizes; 4:4:4 keeps odd ones exactly.
                    stream.pix_fmt = "yuv444p" if (w % 2 or h % 2) else "yuv420p"
                    stream.options = {"crf": str(crf), "preset": "veryfast"} if codec == "libx264" else {}
                stream.width, stream.height = w, h
                if times is not None:
                    stream.codec_context.time_base = Fraction(1, 1000)
                if rotation:
                    stream.set_display_rotation(rotation)
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if times is not None:
                vf.pts = int(round(next(times) * 1000))
                vf.time_base = Fraction(1, 1000)
            container.mux(stream.encode(vf))
        if stream is None:
            raise ValueError("no frames to write")
        container.mux(stream.encode(None))
    return path


def index_frame(i: int, height: int = 120, width: int = 160) -> np.ndarray:
    """A frame whose two halves' grey levels encode ``i`` (0 ≤ i < 256), robust to compression."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:, : width // 2] = (i // 16) * 16 + 8
    frame[:, width // 2 :] = (i % 16) * 16 + 8
    return frame


def index_frames(n: int, height: int = 120, width: int = 160) -> list[np.ndarray]:
    return [index_frame(i % 256, height, width) for i in range(n)]


def read_index(frame: np.ndarray) -> int:
    """Inverse of :func:`index_frame`, read from the middle of each half."""
    h, w = frame.shape[:2]
    hi = float(frame[h // 4 : 3 * h // 4, w // 8 : 3 * w // 8].mean())
    lo = float(frame[h // 4 : 3 * h // 4, 5 * w // 8 : 7 * w // 8].mean())
    return int(round((hi - 8) / 16)) * 16 + int(round((lo - 8) / 16))


def moving_scene(n: int, height: int = 360, width: int = 640, seed: int = 0) -> Iterable[np.ndarray]:
    """A textured background with a moving disc: a cheap stand-in for real footage in benchmarks."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(base, 8, axis=0), 8, axis=1)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        cx = (0.5 + 0.4 * np.sin(i / 20.0)) * width
        cy = (0.5 + 0.3 * np.cos(i / 27.0)) * height
        frame = np.roll(base, i, axis=1).copy()
        frame[(xx - cx) ** 2 + (yy - cy) ** 2 < (height / 8) ** 2] = (240, 40, 40)
        yield frame
