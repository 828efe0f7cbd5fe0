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
    """Encode uint8 RGB frames [H, W, 3]. ``pts_seconds`` gives each frame's time (variable frame rate).

    Where PyAV is not installed (a GPU image with OpenCV but no PyAV), a plain constant-rate video is written with
    OpenCV instead (MPEG-4 part 2 in .mp4, which decord reads); the options only PyAV has are then refused.
    """
    try:
        import av
    except ImportError:
        if codec != "libx264" or rotation or pts_seconds is not None:
            raise ValueError("codec, rotation and pts_seconds need PyAV (pip install av)") from None
        return _write_video_opencv(Path(path), frames, fps)

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


def _write_video_opencv(path: Path, frames: Iterable[np.ndarray], fps: float) -> Path:
    import cv2

    writer = None
    try:
        for frame in frames:
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
                if not writer.isOpened():
                    raise ValueError(f"OpenCV cannot write {path} (its FFmpeg lacks the MPEG-4 encoder)")
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV takes BGR
        if writer is None:
            raise ValueError("no frames to write")
    finally:
        if writer is not None:
            writer.release()
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


# Planted dives for the pose head: clip features built like the pose backbone's (runs of per-frame means).
DIVE_STEPS = ["approach", "takeoff", "flight", "entry"]
DIVE_RUNS, DIVE_RUN_DIM, _DIVE_FRAMES = 4, 6, 32


def planted_dives(folder: str | Path, n: int, seed: int, dim: int = 40) -> list[dict]:
    """Dives of 4–7 clips made frame by frame, like the pose backbone's features: approach (16–47 frames),
    takeoff (8–19), flight (the rest), entry (12–27), boundaries anywhere, not on clip or run borders. Each
    frame shows its step as +2.5 on its own channel (0–3 of 6) plus noise; clip features are the means over
    runs of 8 frames, so a run across a boundary holds the fraction of its frames on each side. Execution
    quality q ~ U(0, 1) shows in the flight frames only (channel 4 = 2·(2q − 1)): execution = 10 + 15 q, dive
    score = execution × DD, DD from 1.5–3.5 independently of q. The steps label covers the whole timeline,
    of which the clips keep the middle (the recipe's trim). Clip features are ``dim``-d: the 4 runs × 6 values,
    then noise. Writes ``<folder>/d000.npy``… and ``labels.csv``; returns the label rows (with the true
    execution score, which the head never sees)."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        clips = int(rng.integers(4, 8))
        timeline = clips * _DIVE_FRAMES + int(rng.integers(0, _DIVE_FRAMES))
        a, b, e = int(rng.integers(16, 48)), int(rng.integers(8, 20)), int(rng.integers(12, 28))
        lengths = [a, b, timeline - a - b - e, e]
        steps = np.repeat(np.arange(4), lengths)
        head = (timeline - clips * _DIVE_FRAMES) // 2
        kept = steps[head:head + clips * _DIVE_FRAMES]
        q = float(rng.uniform(0, 1))
        frame = rng.normal(0, 0.5, (len(kept), DIVE_RUN_DIM)).astype(np.float32)
        frame[np.arange(len(kept)), kept] += 2.5
        frame[kept == 2, 4] += (2 * q - 1) * 2.0
        width = DIVE_RUNS * DIVE_RUN_DIM
        runs = frame.reshape(clips, DIVE_RUNS, _DIVE_FRAMES // DIVE_RUNS, DIVE_RUN_DIM).mean(axis=2)
        x = np.concatenate([runs.reshape(clips, width), rng.normal(0, 1, (clips, dim - width))], axis=1)
        x = x.astype(np.float32)
        dd = float(rng.choice([1.5, 2.0, 2.5, 3.0, 3.5]))
        execution = 10.0 + 15.0 * q
        np.save(folder / f"d{i:03d}.npy", x)
        rows.append({"video": f"d{i:03d}", "dive_score": f"{execution * dd:.4f}", "difficulty": f"{dd}",
                     "steps": " ".join(f"{DIVE_STEPS[k]}:{m}" for k, m in enumerate(lengths)),
                     "execution": f"{execution:.4f}"})
    import pandas as pd  # only here: the video helpers above do not need it

    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return rows


def planted_step_figures(head, data) -> dict[str, float]:
    """How a pose head with a step branch reads planted dives' steps, held out: per-frame accuracy, the mean
    |error| of the 3 inner step boundaries in frames, and that error for a perfect classifier of whole runs
    (every frame of a run given the run's majority step), the best the runs alone allow. The steps of a planted
    dive come in order, so a boundary is the count of frames up to a step."""
    import torch

    from aqa_cli.heads.pose import _encode_steps

    def boundaries(classes: np.ndarray) -> np.ndarray:
        return np.array([(classes <= k).sum() for k in range(len(DIVE_STEPS) - 1)])

    # Not head.encode_labels: that would refill the head's exemplar bank from these dives.
    truth, _ = _encode_steps(head.config, data)
    run = _DIVE_FRAMES // DIVE_RUNS
    correct = total = 0
    err, run_err = [], []
    with torch.inference_mode():
        for i, f in enumerate(data.features):
            pred = head(torch.tensor(f)[None]).extras["step_probs"][0].argmax(-1).numpy()
            true = truth[i, : len(f) * _DIVE_FRAMES].numpy()
            if pred.shape != true.shape or (true < 0).any():
                raise ValueError(f"dive {data.ids[i]}: {pred.shape} predictions for {true.shape} labelled frames")
            correct += int((pred == true).sum())
            total += len(true)
            err.append(np.abs(boundaries(pred) - boundaries(true)))
            majority = np.array([np.bincount(r, minlength=len(DIVE_STEPS)).argmax() for r in true.reshape(-1, run)])
            run_err.append(np.abs(boundaries(majority.repeat(run)) - boundaries(true)))
    return {"accuracy": correct / total, "boundary_error": float(np.mean(err)),
            "run_boundary_error": float(np.mean(run_err))}
