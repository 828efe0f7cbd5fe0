"""Video decoding: probe a file, then stream its frames in order.

decord is the primary decoder because it is fast at batched, seekable reads.
PyAV is the fallback for what decord cannot open (GIF, odd containers) and for
installations without decord; it also probes every file first, because it
reads rotation metadata that decord ignores and fails cleanly on non-videos.
Both are imported only when used: an installation with decord alone (a GPU
image that carries its wheel) opens videos with decord, without the probe.

Frames are yielded in small chunks so that callers can shrink them at once:
nothing here ever holds more than ``chunk_size`` full-resolution frames.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aqa_cli.errors import VideoError

_TRUNCATED_HINT = "the file looks truncated or corrupt; re-download or re-encode it (ffmpeg -i in.mp4 -c:v libx264 out.mp4)"

try:  # decord is optional at run time: PyAV covers everything it does, more slowly.
    import decord as _decord

    _decord.bridge.set_bridge("native")
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    _decord = None


def _pyav():
    """PyAV, or None where it is not installed (a GPU image that carries decord alone, say)."""
    try:
        import av
    except ImportError:
        return None
    return av


def available_decoders() -> dict[str, str | None]:
    """Decoder name → version string, or None when it cannot be imported."""
    av = _pyav()
    return {
        "decord": getattr(_decord, "__version__", "unknown") if _decord is not None else None,
        "pyav": av.__version__ if av is not None else None,
    }


@dataclass(frozen=True)
class VideoInfo:
    """What a probe learns about a video. Sizes are as displayed (after rotation)."""

    path: str
    decoder: str
    num_frames: int
    fps: float
    width: int
    height: int
    rotation: int
    duration_s: float
    variable_frame_rate: bool
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


class VideoReader:
    """A probed video whose frames can be streamed in increasing index order.

    Use :func:`open_video` to make one. ``timestamps`` holds each frame's
    presentation time in seconds, starting at 0, in decode order.
    """

    def __init__(self, info: VideoInfo, timestamps: np.ndarray):
        self.info = info
        self.timestamps = timestamps

    def iter_chunks(self, indices: Sequence[int], chunk_size: int = 8) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield ``(indices, frames)`` with frames as uint8 RGB [n, H, W, 3], rotated for display.

        ``indices`` must be sorted, unique and inside the video. Raises
        :class:`VideoError` when the file stops decoding before the last one.
        """
        raise NotImplementedError

    def _rotate(self, frames: np.ndarray) -> np.ndarray:
        if self.info.rotation % 360 == 0:
            return frames
        # The display matrix angle is counter-clockwise, as is np.rot90 for k > 0.
        return np.ascontiguousarray(np.rot90(frames, k=(self.info.rotation // 90) % 4, axes=(1, 2)))

    def close(self) -> None:
        pass

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _DecordReader(VideoReader):
    def __init__(self, info: VideoInfo, timestamps: np.ndarray, vr: object):
        super().__init__(info, timestamps)
        self._vr = vr

    # Frames per get_batch call: large enough that the rewind below is paid rarely, small
    # enough to bound memory. 32 frames at most, 64 MiB of RGB at most (measured: flat
    # peak RSS from 30 s to 120 s videos, decoding still ~10x faster than I3D on a CPU).
    _CHUNK_FRAMES = 32
    _CHUNK_BYTES = 64 << 20

    def iter_chunks(self, indices: Sequence[int], chunk_size: int = 8) -> Iterator[tuple[list[int], np.ndarray]]:
        indices = list(indices)
        frame_bytes = max(1, self.info.width * self.info.height * 3)
        chunk_size = max(chunk_size, min(self._CHUNK_FRAMES, self._CHUNK_BYTES // frame_bytes))
        for start in range(0, len(indices), chunk_size):
            chunk = indices[start : start + chunk_size]
            try:
                frames = self._vr.get_batch(chunk).asnumpy()
                # After get_batch, decord's decoder thread keeps decoding ahead, unbounded, while
                # the caller is busy (dmlc/decord#197, #208): with a slow backbone it would hold the
                # rest of the video in memory. Rewinding parks it; the next call seeks from the
                # nearest keyframe, which costs far less than the backbone's time per chunk.
                self._vr.seek(0)
            except Exception as exc:  # noqa: BLE001 - decord raises its own DECORDError and RuntimeErrors
                raise VideoError(
                    f"decoding failed at frame {chunk[0]} of {self.info.num_frames} ({_short(exc)})",
                    path=self.info.path,
                    fix=_TRUNCATED_HINT,
                ) from None
            # decord (0.6) already applies the display rotation, with the same convention as _rotate.
            yield chunk, frames

    def close(self) -> None:
        self._vr = None


class _PyAVReader(VideoReader):
    """Sequential decoding with PyAV: each call to iter_chunks decodes from the start."""

    def iter_chunks(self, indices: Sequence[int], chunk_size: int = 8) -> Iterator[tuple[list[int], np.ndarray]]:
        import av

        wanted = list(indices)
        if not wanted:
            return
        pos = 0
        batch_idx: list[int] = []
        batch: list[np.ndarray] = []
        frame_no = -1
        try:
            with av.open(self.info.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    frame_no += 1
                    if frame_no < wanted[pos]:
                        continue  # skip colour conversion for frames nobody asked for
                    batch_idx.append(frame_no)
                    batch.append(frame.to_ndarray(format="rgb24"))
                    pos += 1
                    if len(batch) == chunk_size or pos == len(wanted):
                        yield batch_idx, self._rotate(np.stack(batch))
                        batch_idx, batch = [], []
                    if pos == len(wanted):
                        return
        except av.FFmpegError as exc:
            raise VideoError(
                f"decoding failed after frame {frame_no} of {self.info.num_frames} ({_short(exc)})",
                path=self.info.path,
                fix=_TRUNCATED_HINT,
            ) from None
        raise VideoError(
            f"the video ended at frame {frame_no + 1} but {self.info.num_frames} frames were announced",
            path=self.info.path,
            fix=_TRUNCATED_HINT,
        )


def _short(exc: BaseException) -> str:
    """The decoder's reason in plain words: ffmpeg's own message without its error number and the file's name
    (the error line names the file already); decord's first line without its C++ stack trace."""
    strerror = getattr(exc, "strerror", None)
    if isinstance(strerror, str) and strerror:
        text = strerror  # av.FFmpegError: "Invalid data found when processing input"
    else:
        text = " ".join(str(exc).split()).split(" Stack trace")[0]
        text = re.sub(r"\[Errno -?\d+\]|\[[\d:]+\] ?/\S+:\d+: ", "", text)  # error numbers, C++ source lines
    text = " ".join(text.split()).strip(" :,.") or type(exc).__name__
    return (text[0].lower() + text[1:])[:100]


def _not_a_video(path: Path, exc: BaseException) -> VideoError:
    """The error for a file ffmpeg cannot open: a known non-video type is named as such."""
    from aqa_cli.inputs import VIDEO_EXTENSIONS

    suffix = path.suffix.lower()
    if suffix and suffix not in VIDEO_EXTENSIONS:
        return VideoError(f"not a readable video (a {suffix} file)", path=path,
                          fix="pass a video file; folders are searched for videos by extension")
    return VideoError(f"not a readable video ({_short(exc)})", path=path,
                      fix="check that it is a video file and not truncated")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError("no such file", path=path, fix="check the path")
    if path.is_dir():
        raise VideoError("is a folder, not a video", path=path, fix="pass the videos inside it")
    if path.stat().st_size == 0:
        raise VideoError("the file is empty (0 bytes)", path=path, fix="re-download or re-export the video")


def _probe_pyav(path: Path) -> tuple[dict, np.ndarray]:
    """Rotation, size, fps and per-frame timestamps, from container metadata and one decoded frame."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise _not_a_video(path, exc) from None
    with container:
        if not container.streams.video:
            raise VideoError("has no video stream", path=path, fix="pass a file with a video track")
        stream = container.streams.video[0]
        time_base = float(stream.time_base) if stream.time_base else 0.0
        try:
            pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0]
        except av.FFmpegError:
            pts = []  # a damaged tail; the decoder below reports what is really readable
        container.seek(0)
        rotation = 0
        first = None
        try:
            for frame in container.decode(stream):
                first = frame
                rotation = int(round(getattr(frame, "rotation", 0) or 0))
                break
        except av.FFmpegError as exc:
            raise VideoError(
                f"no frame could be decoded ({_short(exc)})", path=path, fix="re-encode or re-download the video"
            ) from None
        if first is None:
            raise VideoError("has zero decodable frames", path=path, fix="re-encode or re-download the video")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        stamps = np.sort(np.asarray(pts, dtype=np.float64)) * time_base if time_base else np.zeros(0)
        if stamps.size >= 2 and not np.all(np.diff(stamps) > 0):
            stamps = np.zeros(0)  # duplicated pts: timestamps are useless, fall back to the nominal rate
        width, height = first.width, first.height
        announced = container.duration / 1e6 if container.duration else None
    return {"fps": fps, "width": width, "height": height, "rotation": rotation, "announced_s": announced}, stamps


def _truncation_warnings(meta: dict, duration_s: float) -> tuple[str, ...]:
    announced = meta.get("announced_s")
    if announced and duration_s < 0.9 * announced - 0.5:
        return (f"the container announces {announced:.1f} s but only {duration_s:.1f} s can be read: "
                "the file looks truncated",)
    return ()


def _finish_timestamps(stamps: np.ndarray, num_frames: int, fps: float) -> tuple[np.ndarray, float, bool]:
    """Normalise timestamps to start at 0; fill from the nominal rate when they are missing."""
    if stamps.size == num_frames and num_frames > 0:
        stamps = stamps - stamps[0]
    else:
        stamps = np.arange(num_frames, dtype=np.float64) / (fps or 25.0)
    if not fps or not math.isfinite(fps):
        fps = (num_frames - 1) / stamps[-1] if num_frames > 1 and stamps[-1] > 0 else 25.0
    vfr = False
    if num_frames > 2:
        gaps = np.diff(stamps)
        vfr = bool(gaps.std() > 0.05 * max(gaps.mean(), 1e-9))
    return stamps, fps, vfr


def open_video(path: str | Path, decoder: str = "auto") -> VideoReader:
    """Probe ``path`` and return a reader: decord when it can read the file, else PyAV.

    ``decoder`` forces "decord" or "pyav". Raises :class:`VideoError` for missing,
    empty, non-video and undecodable files.
    """
    path = Path(path)
    _check_file(path)
    if _pyav() is None:
        if decoder == "pyav" or _decord is None:
            raise VideoError("PyAV is not installed" + ("" if _decord is not None else ", nor decord"), path=path,
                             fix="pip install av" + (", or use --decoder decord" if _decord is not None else ""))
        return _open_decord_alone(path)
    meta, av_stamps = _probe_pyav(path)
    rotation = meta["rotation"]
    swap = rotation % 180 != 0

    use_decord = decoder in ("auto", "decord") and _decord is not None and path.suffix.lower() != ".gif"
    if decoder == "decord" and _decord is None:
        raise VideoError("decord is not installed", path=path, fix="pip install decord, or use --decoder pyav")
    if use_decord:
        try:
            vr = _decord.VideoReader(str(path), ctx=_decord.cpu(0))
            n = len(vr)
            if n > 0:
                fps = float(vr.get_avg_fps())
                stamps = np.asarray(vr.get_frame_timestamp(range(n)), dtype=np.float64)[:, 0]
                stamps, fps, vfr = _finish_timestamps(stamps, n, fps)
                w, h = meta["width"], meta["height"]
                # decord opens some files it then decodes wrongly: frames narrower than about 32 px come back
                # as buffers of another size ("from_size == to_size" at the first get_batch). One frame
                # decoded here, checked against the probed size, sends such files to PyAV.
                first = vr.get_batch([0]).asnumpy()
                if first.shape[1:] != ((w, h, 3) if swap else (h, w, 3)):
                    raise ValueError(f"decodes frames of shape {first.shape[1:]} for a {w}x{h} video")
                vr.seek(0)
                duration = float(stamps[-1] + 1.0 / fps)
                info = VideoInfo(
                    str(path), "decord", n, fps, h if swap else w, w if swap else h, rotation, duration, vfr,
                    _truncation_warnings(meta, duration),
                )
                return _DecordReader(info, stamps, vr)
        except Exception as exc:  # noqa: BLE001 - any decord failure means "try PyAV"
            if decoder == "decord":
                raise VideoError(f"decord cannot read it ({_short(exc)})", path=path, fix="use --decoder pyav") from None

    n = int(av_stamps.size)
    if n == 0:
        n = _count_frames_pyav(path)
    if n == 0:
        raise VideoError("has zero decodable frames", path=path, fix="re-encode or re-download the video")
    stamps, fps, vfr = _finish_timestamps(av_stamps, n, meta["fps"])
    w, h = meta["width"], meta["height"]
    duration = float(stamps[-1] + 1.0 / fps)
    info = VideoInfo(
        str(path), "pyav", n, fps, h if swap else w, w if swap else h, rotation, duration, vfr,
        _truncation_warnings(meta, duration),
    )
    return _PyAVReader(info, stamps)


def _open_decord_alone(path: Path) -> VideoReader:
    """decord without PyAV's probe (where PyAV is not installed): decord applies the display rotation itself,
    but does not report it, so ``info.rotation`` reads 0; non-videos fail here as they would in the probe."""
    try:
        vr = _decord.VideoReader(str(path), ctx=_decord.cpu(0))
        n = len(vr)
        if n == 0:
            raise VideoError("has zero decodable frames", path=path, fix="re-encode or re-download the video")
        fps = float(vr.get_avg_fps())
        stamps = np.asarray(vr.get_frame_timestamp(range(n)), dtype=np.float64)[:, 0]
        h, w = vr[0].shape[:2]
        vr.seek(0)
    except VideoError:
        raise
    except Exception as exc:  # noqa: BLE001 - decord raises its own DECORDError and RuntimeErrors
        raise VideoError(f"not a readable video ({_short(exc)})", path=path,
                         fix="check that it is a video file and not truncated (or pip install av for more formats)"
                         ) from None
    stamps, fps, vfr = _finish_timestamps(stamps, n, fps)
    duration = float(stamps[-1] + 1.0 / fps)
    return _DecordReader(VideoInfo(str(path), "decord", n, fps, int(w), int(h), 0, duration, vfr), stamps, vr)


def _count_frames_pyav(path: Path) -> int:
    import av

    n = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                n += 1
    except av.FFmpegError:
        pass
    return n
