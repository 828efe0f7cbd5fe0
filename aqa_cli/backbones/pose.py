"""Body pose per frame (MediaPipe BlazePose), pooled into one feature per clip.

The estimator is the BlazePose pair shipped inside the ``mediapipe`` wheel
(``pose_detection.tflite`` finds a person, ``pose_landmark_full.tflite`` places
33 landmarks in the image and in metres around the hips), run through
MediaPipe's legacy ``solutions.pose`` API, so nothing is downloaded at run
time. Only 0.10.14–0.10.21 ship these files; from 0.10.30 the wheel carries no
models and the Tasks API needs a ``.task`` bundle from the network. We pin
0.10.14 (0.10.18 and 0.10.21 declare ``numpy<2``), installed without its declared
dependencies, which would pull jax and other packages this backbone never uses.

**Which person.** The estimator returns one person per call. It runs in
MediaPipe's video mode, which follows the person it found from frame to frame.
To follow the largest person when several are visible, every ``search_every``
frames (1 s) the frame is also searched person by person: a still-image
estimator is run, the person found is blacked out, and it is run again (up to
``max_people`` times). When the largest person found is clearly larger than
the followed one (1.2× the landmark box, little overlap), a fresh tracker is
started on the frame with everyone else blacked out, and follows that person
from then on. The result depends only on the frames (the same video gives the
same landmarks).

**Normalisation.** Landmarks (x, y in pixels, z on the x scale, as BlazePose
defines it) are centred on the hip midpoint and divided by the torso length
(hip midpoint to shoulder midpoint, in 3-D so that a torso pointing at the
camera does not blow the scale up). Visibility is kept.

**The clip feature** (``FEATURE_DIM`` = 837), for a 32-frame clip split into
``SEGMENTS`` = 4 runs of 8 frames, per run: the mean normalised position of the
33 landmarks (99), their mean velocity in torso lengths per second (99), the
hip midpoint's image velocity in torso lengths per second (2: whole-body
translation, which normalisation removes; a dive is mostly that), and the
fraction of the run's frames with a person (1); then the clip's mean
visibility per landmark (33). Runs rather than one mean over the clip because
a clip is 1.28 s, in which a diver turns a full somersault: one mean pose
would blur it into a ball. Runs rather than all 32 frames flattened because
that would be 4,224 values per clip, mostly noise of the estimator.

**Phantoms.** BlazePose fits a body to whatever its detector fired on, and on
high-contrast random texture (``synthetic.moving_scene``) it fires on most
frames: a whole skeleton folded into the moving disc, or pointing straight at
the camera. Real footage has the same failure as misfits (a skeleton with its
nose on the belly, a hand over the lens read as a torso). The API offers no
score to refuse them by: presence is not filled in (0 for every landmark of
every frame), visibility is higher on phantoms than on people (mean torso
visibility: median 0.99 on phantoms, 0.85 and 0.97 on the two real videos), and
the tracking confidence does not separate them either (at 0.9 a person is still
reported in 33 of 64 texture frames, and arm_wrestling.mp4 keeps 91 of its
195). What gives a phantom away is the body it implies. BlazePose's world
landmarks are in metres whatever the person's size in the frame, and a body has
proportions, so every body must pass a plausibility gate of three checks
(:func:`plausible_body`; thresholds and measured figures at the constants): the
torso is not short against the limbs, the body does not lie along the line of
sight, the nose is not inside the chest. Which way up the person is does not
matter (copies of the real videos turned by 90°, 180° and 270° pass as the
originals do), which an athlete needs. The one pose a real person can have and
still fail is a body pointing at the camera (a swimmer coming straight at it, a
diver filmed from below), rare in sport footage. A body that fails is no person
in that frame (``rejected`` in the per-frame file). When the followed body
fails, the tracker is restarted, so that the next frame is searched afresh
instead of following a phantom or a misfit on. Against restarting only after
three failures in a row (bench_pose_gate.py): the mirrored pancake video, where
a misfit fails on and off, keeps 253 frames with a person and 2 refused instead
of 239 and 11; the shrunken arm_wrestling.mp4, where a real person's frame
fails once and the detector is slow to find them again, keeps 209 instead of
212.

**No person.** A frame without a person is marked (``person`` False in the
per-frame file, NaN landmarks there), never filled in. In the clip feature the
run's presence fraction says how many frames its means come from; a run with
no person has presence 0 and zeros in its means, which the presence channel
marks as missing, not as a pose at the origin.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import torch

from aqa_cli.backbones import Backbone, BackboneSpec, register_backbones
from aqa_cli.errors import AqaError
from aqa_cli.recipes import POSE_RECIPE

MEDIAPIPE_VERSION = "0.10.14"
INSTALL = (f"pip install --no-deps mediapipe=={MEDIAPIPE_VERSION} && pip install absl-py attrs flatbuffers "
           f"'protobuf>=4.25.3,<5' opencv-python-headless")
# The models the legacy API loads for model_complexity=1, inside the mediapipe package.
MODEL_FILES = ("modules/pose_detection/pose_detection.tflite", "modules/pose_landmark/pose_landmark_full.tflite")

N_LANDMARKS = 33
NOSE, L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 0, 11, 12, 23, 24
# The long bones of the limbs as landmark pairs: upper arms, forearms, thighs, shins (left, right).
LIMB_BONES = ((11, 13), (12, 14), (13, 15), (14, 16), (23, 25), (24, 26), (25, 27), (26, 28))
# Shoulders, elbows, wrists, hips, knees, ankles: the body's extent, without the face, hands and feet that sit
# close to other points.
BODY_JOINTS = (11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)

# The plausibility gate. Figures from bench/bench_pose_gate.py: BlazePose's world landmarks on every frame with
# a person of arm_wrestling.mp4 and flipping_a_pancake.mkv and of copies of both turned by 90°, 180° and 270°,
# mirrored, and shrunk to 35% in a grey frame (2,696 frames, "real"), against the random-texture scenes of
# synthetic.moving_scene at 11 seeds and sizes and samples/moving_disc.mp4 (708 frames, "phantom"). Each
# threshold lies beyond the real frames' 1st (or 99th) percentile; the real frames they flag that were looked
# at were misfits.
#
# Torso (hip midpoint to shoulder midpoint) over the mean long limb bone. Anthropometric tables put it at 1.40
# (torso 0.29 of stature, limb bones 0.15-0.25); real frames: 1st percentile 1.49, median 1.85, never below 1.42
# in the two unaltered videos; phantoms: median 1.26, a short torso between long limbs. Alone it flags 56% of
# phantom frames and 6 real ones.
MIN_TORSO_TO_LIMB = 1.3
# How far the body lies along the line of sight: the root-mean-square spread of BODY_JOINTS in depth over their
# spread in 3-D (0 = flat across the image, 1 = a line pointing at the camera; an anthropometric adult pointing
# straight at it scores 0.91, one leaning 70° towards it 0.85). Real frames: median 0.35, 99th percentile 0.89
# (0.81 in the unaltered videos); phantoms: 5th percentile 0.89, median 0.95, a body seen end on being what fits
# into a disc. Alone it flags 93% of phantom frames and 5 real ones, all a hand over the lens.
MAX_END_ON = 0.9
# Nose to the shoulder midpoint in metres: ~0.2 m in an adult, ~0.12 m with the chin on the chest. Real frames:
# 1st percentile 0.09, median 0.19; phantoms: median 0.09. Alone it flags 44% of phantom frames and 22 real
# ones (0.8%: the skeletons looked at had the nose on the belly or in a hand).
MIN_NOSE_M = 0.08
# Together they flag 98.2% of phantom frames and 31 real ones (1.1%), before the tracker restarts (module notes).

# Part of the features' identity (BACKBONE.weights, hence the cache key): bump it when the gate changes.
GATE_VERSION = 1

SEGMENTS = 4
PER_SEGMENT = 3 * N_LANDMARKS * 2 + 2 + 1
FEATURE_DIM = SEGMENTS * PER_SEGMENT + N_LANDMARKS

FRAME_OUTPUTS = {
    "person": "bool [clips, frames]: a person was found in the frame",
    "landmarks": "float32 [clips, frames, 33, 4]: x, y as fractions of the frame's width and height, z on the "
                 "x scale (BlazePose), visibility; NaN where no person",
    "rejected": "bool [clips, frames]: BlazePose placed a body that failed the plausibility gate and no other "
                "person was accepted; person is False there",
    "world": "float32 [clips, frames, 33, 3]: BlazePose's metric 3-D landmarks around the hips; NaN where no person",
    "normalised": "float32 [clips, frames, 33, 3]: centred on the hips, divided by the torso length; NaN where "
                  "no person",
}


def body_measures(world: np.ndarray) -> dict[str, np.ndarray]:
    """The gate's measures of BlazePose world landmarks [..., 33, 3] (metres), each an array [...]:
    ``torso_to_limb``, ``end_on`` and ``nose_m`` (defined at the thresholds)."""
    world = np.asarray(world, dtype=np.float64)
    shoulder = (world[..., L_SHOULDER, :] + world[..., R_SHOULDER, :]) / 2
    hip = (world[..., L_HIP, :] + world[..., R_HIP, :]) / 2
    torso = np.linalg.norm(shoulder - hip, axis=-1)
    bones = np.stack([np.linalg.norm(world[..., a, :] - world[..., b, :], axis=-1) for a, b in LIMB_BONES], axis=-1)
    body = world[..., BODY_JOINTS, :]
    spread = body - body.mean(axis=-2, keepdims=True)
    depth_sq = (spread[..., 2] ** 2).sum(axis=-1)
    total_sq = (spread ** 2).sum(axis=(-2, -1))
    # A skeleton collapsed to a point has no proportions: it scores 0 and 1, failing the gate, instead of 0 / 0.
    flat = total_sq < 1e-12
    return {"torso_to_limb": torso / np.maximum(bones.mean(axis=-1), 1e-6),
            "end_on": np.where(flat, 1.0, np.sqrt(depth_sq / np.where(flat, 1.0, total_sq))),
            "nose_m": np.linalg.norm(world[..., NOSE, :] - shoulder, axis=-1)}


def plausible_body(world: np.ndarray) -> np.ndarray:
    """Bool [...]: world landmarks [..., 33, 3] describe a body a person could have (see the thresholds)."""
    m = body_measures(world)
    return (m["torso_to_limb"] >= MIN_TORSO_TO_LIMB) & (m["end_on"] <= MAX_END_ON) & (m["nose_m"] >= MIN_NOSE_M)


def _import_mediapipe():
    try:
        from mediapipe.python.solutions import pose as mp_pose
    except ImportError as exc:
        raise AqaError(f"the pose backbone needs mediapipe=={MEDIAPIPE_VERSION} ({exc.name or 'mediapipe'} is not "
                       "installed)", fix=f"install it: {INSTALL}") from None
    return mp_pose


def _model_paths() -> list[Path]:
    mp = importlib.import_module("mediapipe")
    root = Path(mp.__file__).resolve().parent
    paths = [root / rel for rel in MODEL_FILES]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise AqaError(f"mediapipe {getattr(mp, '__version__', '?')} does not carry {missing[0].name}",
                       path=root, fix=f"install the pinned version: {INSTALL}")
    return paths


def models_sha256(paths: list[Path]) -> str:
    """One digest over the two model files (names and bytes): what identifies the features' weights."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


class PersonFinder:
    """Largest-person BlazePose on a sequence of frames (see the module notes)."""

    def __init__(self, *, search_every: int = 25, max_people: int = 3, min_confidence: float = 0.3):
        self._mp_pose = _import_mediapipe()
        self.min_confidence = min_confidence
        # Every call of this one detects afresh: it finds the people of one frame for the largest-person check.
        self._static = self._mp_pose.Pose(static_image_mode=True, model_complexity=1, enable_segmentation=False,
                                          min_detection_confidence=min_confidence)
        self._tracker = None
        self.search_every = search_every
        self.max_people = max_people
        self.reset()

    def _new_tracker(self):
        # Video mode: after one detection the landmark model follows the person from its own previous
        # landmarks. BlazePose's detector alone fires on few frames of real sport footage (6 of the first 60 of
        # arm_wrestling.mp4 at confidence 0.5, 26 at 0.3), the tracker keeps the person (57 of 60).
        return self._mp_pose.Pose(static_image_mode=False, model_complexity=1, enable_segmentation=False,
                                  min_detection_confidence=self.min_confidence,
                                  min_tracking_confidence=self.min_confidence)

    def reset(self) -> None:
        if self._tracker is not None:
            self._tracker.close()
        self._tracker = self._new_tracker()
        self._count = 0
        self.rejected = False  # the last frame had a body that failed the gate, and no person was accepted

    def close(self) -> None:
        self._tracker.close()
        self._static.close()

    @staticmethod
    def _estimate(pose, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        res = pose.process(np.ascontiguousarray(rgb))
        if res.pose_landmarks is None:
            return None
        lm = np.array([[p.x, p.y, p.z, p.visibility] for p in res.pose_landmarks.landmark], dtype=np.float32)
        world = np.array([[p.x, p.y, p.z] for p in res.pose_world_landmarks.landmark], dtype=np.float32)
        return lm, world

    @staticmethod
    def _box_of(lm: np.ndarray, w: int, h: int) -> tuple[float, float, float, float]:
        x, y = np.clip(lm[:, 0], 0, 1) * w, np.clip(lm[:, 1], 0, 1) * h  # the part of the body on screen
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())

    @staticmethod
    def _blacken(img: np.ndarray, box: tuple) -> None:
        h, w = img.shape[:2]
        x0, y0, x1, y1 = box
        mx, my = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
        img[max(0, int(y0 - my)):int(min(h, y1 + my)) + 1, max(0, int(x0 - mx)):int(min(w, x1 + mx)) + 1] = 0

    def _people(self, rgb: np.ndarray) -> tuple[list[tuple[float, tuple, tuple[np.ndarray, np.ndarray]]], bool]:
        """Everyone the detector finds, one at a time (each found body blacked out): ([(area, box, result)],
        whether a body failed the gate). A body that fails is not a person, but it is blacked out and the search
        goes on, so that a phantom found first does not hide a person."""
        h, w = rgb.shape[:2]
        img = rgb.copy()
        found: list[tuple[float, tuple, tuple[np.ndarray, np.ndarray]]] = []
        refused = False
        for _ in range(self.max_people):
            res = self._estimate(self._static, img)
            if res is None:
                break
            box = self._box_of(res[0], w, h)
            if any(_iou(box, b) > 0.3 for _, b, _ in found):
                break  # the remnant of someone already found
            if plausible_body(res[1]):
                found.append((_area(box), box, res))
            else:
                refused = True
            self._blacken(img, box)
        return found, refused

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(landmarks [33, 4], world [33, 3]) of the followed person in this frame, or None; ``self.rejected``
        then says whether a body was found and refused by the plausibility gate."""
        h, w = rgb.shape[:2]
        result = self._estimate(self._tracker, rgb)
        refused = False
        if result is not None and not plausible_body(result[1]):
            # What the tracker follows is not a body (or no longer the person's): restart it, so that the next frame
            # is searched afresh instead of following it on.
            result, refused = None, True
            self._restart_tracker()
        if self._count % self.search_every == 0 or result is None:
            people: list = []
            if self._count % self.search_every == 0:
                people, searched_refused = self._people(rgb)
                refused = refused or searched_refused
            if people:
                area, box, best = max(people, key=lambda p: p[0])
                tracked = None if result is None else self._box_of(result[0], w, h)
                if tracked is None or (area > 1.2 * _area(tracked) and _iou(box, tracked) < 0.3):
                    # Switch to the largest person: a fresh tracker first sees the frame with everyone else
                    # blacked out, so the person it locks on to, and follows from then on, is that one.
                    masked = rgb.copy()
                    for _, other, _ in people:
                        if other is not box:
                            self._blacken(masked, other)
                    self._restart_tracker()
                    result = self._estimate(self._tracker, masked)
                    if result is None or not plausible_body(result[1]):
                        result = best  # the still-image estimate, which passed the gate in _people
        self._count += 1
        self.rejected = refused and result is None
        return result

    def _restart_tracker(self) -> None:
        self._tracker.close()
        self._tracker = self._new_tracker()


def _area(box: tuple) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def normalise_landmarks(landmarks: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image landmarks [..., 33, 4] → (normalised [..., 33, 3], hip midpoint in pixels [..., 2], torso length
    in pixels [...]). NaN stays NaN (frames without a person)."""
    pts = landmarks[..., :3] * np.array([width, height, width], dtype=np.float32)
    hip = (pts[..., L_HIP, :] + pts[..., R_HIP, :]) / 2
    shoulder = (pts[..., L_SHOULDER, :] + pts[..., R_SHOULDER, :]) / 2
    torso = np.linalg.norm(shoulder - hip, axis=-1)
    # A degenerate torso (all four points on one pixel) would divide by ~0; a pixel is the floor.
    torso = np.maximum(torso, 1.0)
    norm = (pts - hip[..., None, :]) / torso[..., None, None]
    return norm.astype(np.float32), hip[..., :2].astype(np.float32), torso.astype(np.float32)


def clip_feature(normalised: np.ndarray, visibility: np.ndarray, hip_px: np.ndarray, torso_px: np.ndarray,
                 person: np.ndarray, fps: float, segments: int = SEGMENTS) -> np.ndarray:
    """One clip's feature (see the module notes) from per-frame arrays: normalised [F, 33, 3], visibility
    [F, 33], hip_px [F, 2], torso_px [F], person [F] bool. Frames without a person are ignored, not zeros."""
    n = len(person)
    vel = np.zeros_like(normalised)
    hip_vel = np.zeros((n, 2), dtype=np.float32)
    pair = np.zeros(n, dtype=bool)  # frame t has a velocity: a person in t and t + 1
    if n > 1:
        pair[:-1] = person[:-1] & person[1:]
        idx = np.flatnonzero(pair)
        vel[idx] = (normalised[idx + 1] - normalised[idx]) * fps
        scale = (torso_px[idx] + torso_px[idx + 1]) / 2
        hip_vel[idx] = (hip_px[idx + 1] - hip_px[idx]) * fps / scale[:, None]
    parts = []
    for seg in np.array_split(np.arange(n), segments):
        have, moving = seg[person[seg]], seg[pair[seg]]
        pos = normalised[have].mean(axis=0).ravel() if len(have) else np.zeros(3 * N_LANDMARKS, np.float32)
        v = vel[moving].mean(axis=0).ravel() if len(moving) else np.zeros(3 * N_LANDMARKS, np.float32)
        hv = hip_vel[moving].mean(axis=0) if len(moving) else np.zeros(2, np.float32)
        parts += [pos, v, hv, np.array([len(have) / max(len(seg), 1)], dtype=np.float32)]
    vis = visibility[person].mean(axis=0) if person.any() else np.zeros(N_LANDMARKS, np.float32)
    parts.append(vis)
    return np.concatenate(parts).astype(np.float32)


class PoseBackbone(Backbone):
    """uint8 clips [B, T, h, w, 3] → clip features [B, 837], plus each frame's landmarks."""

    frame_outputs = FRAME_OUTPUTS

    def __init__(self, spec: BackboneSpec, finder: PersonFinder, weights_sha256: str):
        super().__init__(spec, torch.nn.Identity(), weights_sha256=weights_sha256, class_names=None,
                         device=torch.device("cpu"), precision="fp32")
        self.finder = finder

    def reset(self) -> None:
        self.finder.reset()

    def __call__(self, clips: np.ndarray | torch.Tensor) -> tuple[np.ndarray, None]:
        feats, _, _ = self.run(clips)
        return feats, None

    def run(self, clips: np.ndarray | torch.Tensor) -> tuple[np.ndarray, None, dict[str, np.ndarray]]:
        clips = np.asarray(clips)
        b, t, h, w, _ = clips.shape
        person = np.zeros((b, t), dtype=bool)
        lms = np.full((b, t, N_LANDMARKS, 4), np.nan, dtype=np.float32)
        world = np.full((b, t, N_LANDMARKS, 3), np.nan, dtype=np.float32)
        rejected = np.zeros((b, t), dtype=bool)
        for i in range(b):
            for j in range(t):
                found = self.finder(clips[i, j])
                rejected[i, j] = self.finder.rejected
                if found is not None:
                    person[i, j] = True
                    lms[i, j], world[i, j] = found
        norm, hip, torso = normalise_landmarks(lms, w, h)
        fps = float(self.recipe.fps or 25.0)
        feats = np.stack([clip_feature(norm[i], lms[i, ..., 3], hip[i], torso[i], person[i], fps) for i in range(b)])
        return feats, None, {"person": person, "rejected": rejected, "landmarks": lms, "world": world,
                             "normalised": norm}


def _create(spec: BackboneSpec, device: torch.device, precision: str) -> PoseBackbone:
    if precision != "fp32":
        raise AqaError(f"the pose backbone runs MediaPipe's own float models; --precision {precision} does not apply",
                       fix="drop --precision")
    _import_mediapipe()
    mp = importlib.import_module("mediapipe")
    version = getattr(mp, "__version__", "?")
    paths = _model_paths()
    finder = PersonFinder()
    bb = PoseBackbone(spec, finder, models_sha256(paths))
    bb.mediapipe_version = version
    return bb


BACKBONE = BackboneSpec(
    name="pose",
    description="MediaPipe BlazePose (full) landmarks per frame, pooled per clip: positions, velocities, presence",
    weights=f"mediapipe-{MEDIAPIPE_VERSION}-pose-full-gate{GATE_VERSION}",
    recipe=POSE_RECIPE,
    feature_dim=FEATURE_DIM,
    factory=_create,
)

register_backbones(BACKBONE)
