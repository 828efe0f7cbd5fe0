"""From videos to clip features: streaming extraction, and feature files on disk.

:func:`video_features` runs one video through decode → clips → backbone and
keeps only the small per-clip outputs. Frames are decoded in order, shrunk at
once to the recipe's input size, and dropped as soon as the last clip that
needs them has been assembled, so memory does not grow with video length.
Decoding runs in a background thread (:class:`ClipStream`) and overlaps the backbone's forward
passes; with ``decode_workers`` > 1 the next videos of a batch are decoded ahead as well.

:func:`extract_video` writes ``<stem>.npy`` plus a ``<stem>.json`` sidecar for
one video, or keeps them when they are complete, and turns a bad video into a
failed outcome. Both engines call it per video: :func:`extract_to_folder` (the
local engine, one video after the other) and :mod:`aqa_cli.ray_engine` (Ray
workers, each holding one backbone).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aqa_cli import __version__
from aqa_cli.backbones import Backbone
from aqa_cli.clips import Clip, ClipPlan, plan_clips
from aqa_cli.errors import AqaError, FeatureError
from aqa_cli.fileio import remove_stale_temporaries, sha256_file, write_json, write_npy, write_npz
from aqa_cli.recipes import Recipe
from aqa_cli.validation import check_feature_array, check_feature_values, check_sidecar
from aqa_cli.video import VideoInfo, VideoReader, open_video

FEATURES_FORMAT = "aqa-features/1"


@dataclass
class VideoFeatures:
    """The backbone's output for one video, with everything needed to interpret it."""

    features: np.ndarray  # float32 [clips, D]
    logits: np.ndarray | None  # float32 [clips, classes]
    plan: ClipPlan
    info: VideoInfo
    recipe: Recipe
    backbone: dict
    # Per-frame outputs [clips, clip_len, ...] of backbones that have them (the pose backbone's landmarks).
    frames: dict[str, np.ndarray] | None = None
    frame_outputs: dict[str, str] = field(default_factory=dict)  # their descriptions


def iter_clip_batches(
    reader: VideoReader, plan: ClipPlan, recipe: Recipe, batch_size: int
) -> Iterator[tuple[list[Clip], np.ndarray]]:
    """Yield ``(clips, uint8 [B, T, h, w, 3])`` batches, decoding each needed frame once."""
    clips = plan.clips
    last_use: dict[int, int] = {}
    for clip in clips:
        for i in clip.source_indices:
            last_use[i] = clip.index
    buffer: dict[int, np.ndarray] = {}
    batch: list[Clip] = []
    arrays: list[np.ndarray] = []
    k = 0
    last_decoded = -1
    for idxs, frames in reader.iter_chunks(plan.needed_source_frames()):
        small = recipe.transform_frames(frames)
        del frames
        for i, frame in zip(idxs, small):
            buffer[i] = frame
        last_decoded = idxs[-1]
        while k < len(clips) and clips[k].source_indices[-1] <= last_decoded:
            clip = clips[k]
            arrays.append(np.stack([buffer[i] for i in clip.source_indices]))
            batch.append(clip)
            for i in [i for i in buffer if last_use[i] <= k]:
                del buffer[i]
            k += 1
            if len(batch) == batch_size:
                yield batch, np.stack(arrays)
                batch, arrays = [], []
    if batch:
        yield batch, np.stack(arrays)
    if k < len(clips):
        raise AqaError(f"decoding stopped after frame {last_decoded}", path=reader.info.path,
                       fix="the file looks truncated; re-download or re-encode it")


_END = object()


class ClipStream:
    """One video opened, planned and decoded into clip batches by a background thread, started at once.

    Started ahead of time for the next videos of a batch (``decode_workers``), it decodes them
    while the backbone still works on the current one. ``depth`` bounds how many batches wait in
    memory. :meth:`plan` blocks until the clips are known; iterating yields ``(clips, uint8 batch)``;
    :meth:`close` stops the thread (also on an error, or when the consumer stops early).
    """

    def __init__(self, video: str | Path, recipe: Recipe, batch_size: int, *, decoder: str = "auto",
                 depth: int = 2):
        self.video = Path(video)
        self._planned = threading.Event()
        self._plan: ClipPlan | None = None
        self._info: VideoInfo | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._work, args=(recipe, batch_size, decoder),
                                        name=f"aqa-decode-{self.video.name}", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, recipe: Recipe, batch_size: int, decoder: str) -> None:
        try:
            with open_video(self.video, decoder=decoder) as reader:
                self._plan, self._info = plan_for(reader, recipe), reader.info
                self._planned.set()
                for item in iter_clip_batches(reader, self._plan, recipe, batch_size):
                    if not self._put(item):
                        return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed over to the consumer
            self._error = exc
            self._planned.set()
            self._put(exc)

    def plan(self) -> tuple[ClipPlan, VideoInfo]:
        self._planned.wait()
        if self._plan is None:
            raise self._error  # opening or planning failed
        return self._plan, self._info

    def __iter__(self) -> Iterator[tuple[list[Clip], np.ndarray]]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def plan_for(reader: VideoReader, recipe: Recipe) -> ClipPlan:
    return plan_clips(
        reader.timestamps,
        reader.info.fps,
        clip_len=recipe.clip_len,
        stride=recipe.stride,
        leftover=recipe.leftover,
        target_fps=recipe.timeline_fps,
        path=reader.info.path,
    )


def video_features(
    video: str | Path,
    backbone: Backbone,
    *,
    batch_size: int | None = 4,
    decoder: str = "auto",
    on_plan=None,
    on_batch=None,
    stream: ClipStream | None = None,
) -> VideoFeatures:
    """Decode ``video`` and run every clip through ``backbone``, ``batch_size`` clips at a time
    (None: :meth:`Backbone.auto_batch_size`).

    ``on_plan(plan)`` is called once the clips are known and ``on_batch(n)``
    after each forward pass, for progress display. ``stream``: the video's
    :class:`ClipStream`, when one was started ahead (it is closed here).
    """
    recipe = backbone.recipe
    if batch_size is None:
        batch_size = backbone.auto_batch_size()
    stream = stream or ClipStream(video, recipe, batch_size, decoder=decoder)
    try:
        plan, info = stream.plan()
        if on_plan is not None:
            on_plan(plan)
        feats: list[np.ndarray] = []
        logits: list[np.ndarray] = []
        per_frame: list[dict[str, np.ndarray]] = []
        backbone.reset()  # a backbone that follows a person across clips starts afresh with each video
        for clips, batch in stream:
            f, lg, fr = backbone.run(batch)
            feats.append(f)
            if lg is not None:
                logits.append(lg)
            if fr is not None:
                per_frame.append(fr)
            if on_batch is not None:
                on_batch(len(clips))
        features = np.concatenate(feats).astype(np.float32, copy=False)
        if not np.isfinite(features).all():
            raise AqaError("the backbone produced NaN or inf features", path=video,
                           fix="retry with --precision fp32; if it persists, re-fetch the weights")
        return VideoFeatures(
            features=features,
            logits=np.concatenate(logits).astype(np.float32, copy=False) if logits else None,
            plan=plan,
            info=info,
            recipe=recipe,
            backbone=backbone.identity(),
            frames={k: np.concatenate([fr[k] for fr in per_frame]) for k in per_frame[0]} if per_frame else None,
            frame_outputs=dict(backbone.frame_outputs),
        )
    finally:
        stream.close()


def top_predictions(logits: np.ndarray, class_names: Sequence[str] | None, k: int = 5) -> list[dict]:
    """Video-level top-k: logits averaged over clips, then softmax."""
    mean = logits.mean(axis=0).astype(np.float64)
    prob = np.exp(mean - mean.max())
    prob /= prob.sum()
    order = np.argsort(-prob)[:k]
    names = list(class_names) if class_names else [str(i) for i in range(len(mean))]
    return [{"label": names[i], "index": int(i), "prob": round(float(prob[i]), 6), "logit": round(float(mean[i]), 6)}
            for i in order]


# ---------------------------------------------------------------------------------------------- feature files


def output_paths(video: Path, out_dir: Path) -> tuple[Path, Path]:
    return out_dir / f"{video.stem}.npy", out_dir / f"{video.stem}.json"


def frames_path(npy: Path) -> Path:
    """The sidecar's companion file: per-frame outputs (the pose backbone's landmarks), ``<stem>.frames.npz``."""
    return npy.with_name(f"{npy.stem}.frames.npz")


def person_summary(person: np.ndarray) -> tuple[list[int], list[str]]:
    """Frames with a person per clip, and warnings for frames and clips without one."""
    per_clip = [int(n) for n in person.sum(axis=1)]
    warnings = []
    missing = int(person.size - person.sum())
    if missing:
        empty = sum(1 for n in per_clip if n == 0)
        warnings.append(f"no person in {missing} of {person.size} frames"
                        + (f"; {empty} of {len(per_clip)} clips have none at all" if empty else ""))
    return per_clip, warnings


def make_sidecar(result: VideoFeatures, video: Path, *, video_sha256: str, predictions: list[dict] | None) -> dict:
    sidecar = {
        "format": FEATURES_FORMAT,
        "video": str(video),
        "video_sha256": video_sha256,
        "video_stat": video_stat(video),
        "features_file": f"{video.stem}.npy",
        "shape": list(result.features.shape),
        "dtype": "float32",
        "backbone": result.backbone,
        "recipe": result.recipe.to_dict(),
        "source": result.info.to_dict(),
        "timeline": result.plan.to_dict(),
        "clips": [c.to_dict() for c in result.plan.clips],
        "aqa_version": __version__,
    }
    if predictions is not None:
        sidecar["predictions"] = predictions
    if result.frames is not None:
        sidecar["frames_file"] = frames_path(Path(sidecar["features_file"])).name
        sidecar["frames"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                                 "meaning": result.frame_outputs.get(k, "")} for k, v in result.frames.items()}
        if "person" in result.frames:
            per_clip, warnings = person_summary(result.frames["person"])
            sidecar["person_frames"] = per_clip
            sidecar["warnings"] = warnings
    return sidecar


def read_sidecar(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FeatureError(f"unreadable sidecar ({type(exc).__name__})", path=path,
                           fix="delete it, or re-extract with --overwrite") from None
    if not isinstance(data, dict) or data.get("format") != FEATURES_FORMAT:
        raise FeatureError("not an aqa feature sidecar", path=path, fix="re-extract with --overwrite")
    return check_sidecar(data, path)


def load_features(npy: Path, sidecar: dict | None = None) -> np.ndarray:
    """Load a feature file (float16 or float32) as float32 [T, D], checking it against its sidecar."""
    try:
        arr = np.load(npy, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError, TypeError) as exc:
        raise FeatureError(f"not a readable .npy file ({' '.join(str(exc).split())[:100]})", path=npy,
                           fix="re-extract it") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive under a .npy name
        raise FeatureError("not a .npy array (an .npz archive?)", path=npy, fix="re-extract it")
    check_feature_array(arr, sidecar, npy)
    out = np.asarray(arr, dtype=np.float32)
    check_feature_values(out, npy)
    return out


@dataclass
class ExtractOutcome:
    video: Path
    status: str  # "extracted", "skipped" or "failed"
    features_path: Path | None = None
    sidecar_path: Path | None = None
    clips: int = 0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    predictions: list[dict] | None = None


@dataclass(frozen=True)
class VideoJob:
    """One video, the unit of work of both engines: the file to read and the two files to write."""

    video: Path
    features_path: Path
    sidecar_path: Path


def plan_jobs(videos: Sequence[Path], out_dir: Path) -> list[VideoJob | ExtractOutcome]:
    """A job per video, in order; a video whose output name an earlier one already took is a failed outcome."""
    planned: list[VideoJob | ExtractOutcome] = []
    claimed: dict[str, Path] = {}
    for video in map(Path, videos):
        npy, js = output_paths(video, out_dir)
        if video.stem in claimed:
            exc = AqaError(f"its output name {npy.name} is already used by {claimed[video.stem]}", path=video,
                           fix="rename one of them, or extract them into different --out folders")
            planned.append(failed_outcome(video, exc))
            continue
        claimed[video.stem] = video
        planned.append(VideoJob(video, npy, js))
    return planned


def failed_outcome(video: Path, exc: AqaError) -> ExtractOutcome:
    return ExtractOutcome(video, "failed", error=exc.message if exc.path else f"{video}: {exc.message}")


def video_stat(video: Path) -> dict:
    """What identifies a video file cheaply (no hashing): its size and modification time."""
    st = Path(video).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def made_from(sidecar: dict, video: Path) -> bool:
    """Whether the sidecar's features were made from ``video``: the same file, size and mtime as recorded,
    else the same sha256 (a copy, or the same file reached by another path)."""
    try:
        recorded = sidecar.get("video_stat") or {}
        named = sidecar.get("video")
        if recorded and named and Path(named).resolve() == Path(video).resolve() and recorded == video_stat(video):
            return True
        return sidecar.get("video_sha256") is not None and sha256_file(video) == sidecar["video_sha256"]
    except OSError:
        return False


def _is_complete(npy: Path, js: Path, identity: dict, recipe: Recipe, want_predictions: bool,
                 video: Path | None = None) -> dict | None:
    """The sidecar if ``npy``/``js`` are a finished extraction of ``video`` made the way we would make it now."""
    if not (npy.is_file() and js.is_file()):
        return None
    try:
        sidecar = read_sidecar(js)
        load_features(npy, sidecar)
    except FeatureError:
        return None
    if "frames_file" in sidecar and not (npy.parent / sidecar["frames_file"]).is_file():
        return None
    theirs = sidecar.get("backbone", {})
    # "weights" names more than the file for a backbone that is code around a model (pose: its plausibility gate).
    # Sidecars from before the precision was recorded were all made in fp32.
    if any(theirs.get(k) != identity[k] for k in ("name", "weights", "weights_sha256")) \
            or theirs.get("precision", "fp32") != identity.get("precision", "fp32") \
            or sidecar.get("recipe") != recipe.to_dict():
        raise AqaError(
            f"was made by another backbone, weights, precision or recipe ({theirs.get('name')}, "
            f"{theirs.get('precision', 'fp32')})",
            path=js,
            fix="pass --overwrite to replace it, or choose another --out folder",
        )
    if video is not None and not made_from(sidecar, video):
        raise AqaError(f"holds the features of another video ({str(sidecar.get('video'))[:200]}), not of {video}",
                       path=js, fix="pass --overwrite to replace it, or choose another --out folder")
    if want_predictions and "predictions" not in sidecar:
        return None
    return sidecar


def completed_outcome(job: VideoJob, identity: dict, recipe: Recipe, want_predictions: bool) -> ExtractOutcome | None:
    """A ``skipped`` outcome when the job's outputs are complete, else None.

    Raises :class:`AqaError` when they were made by another backbone, weights or recipe.
    ``identity`` is :meth:`Backbone.identity`: the check needs no model, so a driver that
    only hands videos to workers decides what is complete.
    """
    done = _is_complete(job.features_path, job.sidecar_path, identity, recipe, want_predictions, job.video)
    if done is None:
        return None
    return ExtractOutcome(job.video, "skipped", job.features_path, job.sidecar_path, clips=int(done["shape"][0]),
                          predictions=done.get("predictions"))


class ExtractEvents:
    """Progress hooks for the engines; the CLI overrides them to draw bars."""

    def video_started(self, video: Path) -> None: ...

    def video_planned(self, video: Path, clips: int) -> None: ...

    def clips_done(self, n: int) -> None: ...

    def video_finished(self, outcome: ExtractOutcome) -> None: ...

    def note(self, text: str) -> None:
        """Something the user should know that is not one video's outcome (a worker that died)."""


@dataclass(frozen=True)
class ExtractSettings:
    """How each video is extracted, the same in every engine (and in every worker of one)."""

    batch_size: int = 4  # clips per forward pass
    show_pred: bool = False  # also store the video-level Kinetics top-5
    decoder: str = "auto"
    overwrite: bool = False  # re-extract videos whose outputs are complete


def extract_video(job: VideoJob, backbone: Backbone, settings: ExtractSettings, *, resume: bool = True,
                  events: ExtractEvents | None = None, stream: ClipStream | None = None) -> ExtractOutcome:
    """Extract one video into its two files: the per-video step of every engine.

    With ``resume``, complete outputs are kept (a ``skipped`` outcome). Otherwise the video is
    decoded, run through ``backbone`` and written to temporaries renamed into place, the
    sidecar last. A video that cannot be extracted is a ``failed`` outcome, never an exception.
    """
    events = events or ExtractEvents()
    try:
        if resume:
            done = completed_outcome(job, backbone.identity(), backbone.recipe, settings.show_pred)
            if done is not None:
                return done
        return _extract_one(job, backbone, settings, events, stream)
    except AqaError as exc:
        return failed_outcome(job.video, exc)


def extract_to_folder(
    videos: Sequence[Path],
    backbone: Backbone,
    out_dir: Path,
    *,
    overwrite: bool = False,
    batch_size: int | None = 4,
    show_pred: bool = False,
    decoder: str = "auto",
    events: ExtractEvents | None = None,
    decode_workers: int = 1,
) -> list[ExtractOutcome]:
    """Extract features for each video into ``out_dir``, one after the other (the local engine); one failure
    never stops the batch.

    ``decode_workers`` videos are decoded at a time: the current one and the next ones, ahead of
    the backbone (worth it on a GPU, where decoding is the slower side; each holds at most two
    batches in memory).
    """
    if batch_size is None:
        batch_size = backbone.auto_batch_size()  # once for the batch: every stream cuts the same batches
    settings = ExtractSettings(batch_size=batch_size, show_pred=show_pred, decoder=decoder, overwrite=overwrite)
    events = events or ExtractEvents()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    outcomes: list[ExtractOutcome] = []
    jobs = plan_jobs(videos, out_dir)
    identity = backbone.identity()
    ahead: dict[int, ClipStream] = {}

    def start_ahead(i: int) -> None:
        # Decode the next videos now, unless they will be skipped or refused anyway.
        for j in range(i + 1, min(i + decode_workers, len(jobs))):
            job = jobs[j]
            if j in ahead or isinstance(job, ExtractOutcome):
                continue
            try:
                if not overwrite and completed_outcome(job, identity, backbone.recipe, show_pred) is not None:
                    continue
            except AqaError:
                continue
            ahead[j] = ClipStream(job.video, backbone.recipe, batch_size, decoder=decoder)

    try:
        for i, job in enumerate(jobs):
            events.video_started(job.video)
            if isinstance(job, ExtractOutcome):  # its output name is taken
                outcome = job
            else:
                stream = ahead.pop(i, None)
                start_ahead(i)
                try:
                    outcome = extract_video(job, backbone, settings, resume=not overwrite, events=events,
                                            stream=stream)
                finally:
                    if stream is not None:  # consumed, or not needed after all (the outputs were complete)
                        stream.close()
            outcomes.append(outcome)
            events.video_finished(outcome)
    finally:
        for stream in ahead.values():
            stream.close()
    return outcomes


def _extract_one(job: VideoJob, backbone: Backbone, settings: ExtractSettings, events: ExtractEvents,
                 stream: ClipStream | None = None) -> ExtractOutcome:
    video, npy, js = job.video, job.features_path, job.sidecar_path
    result = video_features(
        video, backbone, batch_size=settings.batch_size, decoder=settings.decoder,
        on_plan=lambda plan: events.video_planned(video, len(plan.clips)),
        on_batch=events.clips_done, stream=stream,
    )
    predictions = None
    if settings.show_pred:
        if result.logits is None:
            raise AqaError(f"backbone {backbone.name} has no classifier head", fix="drop --show-pred")
        predictions = top_predictions(result.logits, backbone.class_names)
    sidecar = make_sidecar(result, video, video_sha256=sha256_file(video), predictions=predictions)
    # The sidecar is written last: its presence marks the pair as complete, so an old
    # one goes first and a run killed in between leaves nothing that looks finished.
    js.unlink(missing_ok=True)
    write_npy(npy, result.features)
    if result.frames is not None:
        write_npz(frames_path(npy), result.frames)
    write_json(js, sidecar)
    return ExtractOutcome(video, "extracted", npy, js, clips=len(result.plan.clips),
                          warnings=[*result.info.warnings, *result.plan.warnings, *sidecar.get("warnings", [])],
                          predictions=predictions)
