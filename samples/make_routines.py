"""Synthetic gymnastics-like "routines" with planted execution faults, for the demo head.

A stick figure (thick limbs, round head) performs one element per 32-frame clip
(run, jump, turn, leap, arm circles, balance) while travelling back and forth on
a floor. Some clips carry a fault with a severity in [0.3, 1]:

* ``wobble``   the body and arms shake (±12–37°, a 3 Hz tremor) and the figure jitters sideways;
* ``fall``     the figure tips over, lies on the floor for 14–22 frames (most of the clip), then gets up;
* ``underrot`` a turn stops short (360° × (1 − 0.55·severity)), staggers and unwinds backwards;
* ``stop``     the figure freezes for 18–28 frames (nothing in the frame moves), then catches up.

The score is ``9.5 − Σ deduction[kind] × severity + N(0, 0.1²)`` on a 0–10 scale, with
deductions fall 3.0, stop 2.0, underrot 1.5, wobble 1.2. Clips and elements are aligned
with the I3D recipe (25 fps, 32-frame clips, no leftover frames), so clip k of a
video is frames 32k … 32k+31 and a fault's clip index is the clip the head sees.

Every draw flows from the routine's seed through three independent streams (the
routine, its faults, the score noise). A fault only changes its own clip's frames:
the figure's path and every other clip render exactly as in the fault-free
routine of the same seed (``tests/test_routines.py`` checks this).

Frames are 256x256: the I3D recipe's short side, so its centre crop keeps
x, y in [16, 240), and the figure stays inside that crop.

This is a demonstration data set for a demonstration model, not a model of any
sport's judging.

Usage (CPU times measured on the 2-core development machine, one thread, while
other jobs kept both cores busy):

    python samples/make_routines.py --samples
        re-renders samples/routine_fall.mp4, samples/routine_clean.mp4 and
        samples/routines.json/.csv (0.6–0.8 s)
    python samples/make_routines.py --train-set 120 --out /work/routines-data
        renders 120 routines (seeds 1000…1119, 731 clips) with labels.csv and labels.json (34–37 s),
    ... --extract
        then extracts their I3D features into OUT/features with aqa's own extractor
        (1.23 s per clip: 847 s for 686 clips, so ~15 min for all 731),
    ... --train weights/demo-interp.safetensors
        then trains the demo head as `aqa train --head interp --preset demo --folds 5
        --final folds --half` does (83 s).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

FPS = 25
CLIP = 32  # frames per clip: the I3D recipe's clip length
SIZE = 256  # square frames: the recipe's short side, so only its centre crop is cut
CROP = (16, 240)  # the centre 224x224 crop in frame coordinates
FLOOR = 218  # floor line (y)
# The pelvis travels here: a body lying or upside down reaches 73 px from it, so it stays inside the crop.
X_RANGE = (89.0, 167.0)

BASE_SCORE = 9.5
DEDUCTIONS = {"fall": 3.0, "stop": 2.0, "underrot": 1.5, "wobble": 1.2}
FAULT_KINDS = tuple(DEDUCTIONS)
ELEMENTS = ("run", "jump", "turn", "leap", "arms", "balance")
# Travel speed (pixels per frame at full pace) by element: runs and leaps cover ground, balances barely move.
SPEED = {"run": 2.2, "jump": 1.2, "turn": 1.0, "leap": 2.2, "arms": 0.6, "balance": 0.3}
SCORE_NOISE = 0.1

# Limb lengths in pixels and the line width: thick enough that a 224-pixel I3D input sees a body, not a sketch.
TORSO, NECK, HEAD_R, UPPER_ARM, FOREARM, THIGH, SHIN, LIMB_W = 41.0, 6.0, 12.0, 24.0, 22.0, 30.0, 29.0, 10


@dataclass(frozen=True)
class Fault:
    kind: str  # one of FAULT_KINDS
    clip: int  # clip index: frames CLIP·clip … CLIP·clip + CLIP − 1
    severity: float  # 0.3 (minor) … 1.0 (major)

    @property
    def frames(self) -> tuple[int, int]:
        """First and last frame (inclusive) of the fault's clip."""
        return CLIP * self.clip, CLIP * self.clip + CLIP - 1

    def to_dict(self) -> dict:
        first, last = self.frames
        return {"kind": self.kind, "clip": self.clip, "frame_start": first, "frame_end": last,
                "severity": round(self.severity, 3), "deduction": round(DEDUCTIONS[self.kind] * self.severity, 3)}


@dataclass(frozen=True)
class Routine:
    """Everything that determines a video: its seed, elements, look, and faults."""

    seed: int
    elements: tuple[str, ...]  # one per clip
    faults: tuple[Fault, ...] = ()
    look: dict = field(default_factory=dict, compare=False)

    @property
    def n_clips(self) -> int:
        return len(self.elements)

    @property
    def n_frames(self) -> int:
        return CLIP * self.n_clips

    @property
    def score(self) -> float:
        """Ground truth: base minus each fault's deduction × severity, plus the seed's small noise, in [0, 10]."""
        noise = np.random.default_rng([self.seed, 2]).normal(0.0, SCORE_NOISE)
        raw = BASE_SCORE - sum(DEDUCTIONS[f.kind] * f.severity for f in self.faults) + noise
        return round(float(np.clip(raw, 0.0, 10.0)), 3)

    def without_faults(self) -> Routine:
        return replace(self, faults=())

    def label(self, video_id: str) -> dict:
        return {"id": video_id, "seed": self.seed, "score": self.score, "n_clips": self.n_clips,
                "n_frames": self.n_frames, "fps": FPS, "elements": list(self.elements),
                "faults": [f.to_dict() for f in sorted(self.faults, key=lambda f: f.clip)]}


def plan_routine(seed: int, *, n_clips: int | None = None, faults: Sequence[Fault] | None = None) -> Routine:
    """The routine of ``seed``: 5–7 clips of elements and, unless ``faults`` is given, 0–2 random faults.

    The elements and look come from the stream ``[seed, 0]`` and the faults from ``[seed, 1]``, so
    fixing the faults (or removing them) leaves the rest of the routine unchanged.
    """
    rng = np.random.default_rng([seed, 0])
    n = int(rng.integers(5, 8)) if n_clips is None else int(n_clips)
    if n < 1:
        raise ValueError(f"a routine needs at least one clip, not {n}")
    elements = tuple(str(e) for e in rng.choice(ELEMENTS, size=n, p=[0.2, 0.2, 0.25, 0.15, 0.1, 0.1]))
    look = {
        # A light, nearly grey wall and a saturated body: the figure must stand out whatever the draw.
        "wall": tuple(int(v) for v in np.clip(rng.integers(170, 215) + rng.integers(-15, 16, 3), 0, 255)),
        "floor": tuple(int(v) for v in rng.integers(60, 120, 3)),
        "body": tuple(int(255 * v) for v in colorsys.hsv_to_rgb(rng.uniform(), 0.9, rng.uniform(0.45, 0.7))),
        "x0": float(rng.uniform(*X_RANGE)),
        "direction": int(rng.choice([-1, 1])),
        "pace": float(rng.uniform(0.8, 1.2)),
        "panels": int(rng.integers(3, 7)),
    }
    if faults is None:
        faults = _draw_faults(np.random.default_rng([seed, 1]), elements)
    faults = tuple(faults)
    clips = [f.clip for f in faults]
    if len(set(clips)) != len(clips) or any(not 0 <= c < n for c in clips):
        raise ValueError(f"faults need distinct clips in 0…{n - 1}, got {clips}")
    for f in faults:
        if f.kind not in DEDUCTIONS or not 0.0 <= f.severity <= 1.0:
            raise ValueError(f"bad fault {f}: kind must be one of {FAULT_KINDS}, severity in [0, 1]")
    # An under-rotated turn is a fault of a turn: its clip's element is a turn in the fault-free routine too.
    elements = tuple("turn" if any(f.clip == k and f.kind == "underrot" for f in faults) else e
                     for k, e in enumerate(elements))
    return Routine(seed=seed, elements=elements, faults=faults, look=look)


def _draw_faults(rng: np.random.Generator, elements: Sequence[str]) -> tuple[Fault, ...]:
    count = int(rng.choice([0, 1, 2], p=[0.25, 0.45, 0.30]))
    clips = sorted(int(c) for c in rng.choice(len(elements), size=min(count, len(elements)), replace=False))
    return tuple(Fault(str(rng.choice(FAULT_KINDS)), c, round(float(rng.uniform(0.3, 1.0)), 3)) for c in clips)


# --------------------------------------------------------------------------------------------------- motion


@dataclass
class State:
    """What one frame shows: the pelvis position, facing, joint angles (degrees) and whole-body rotation."""

    x: float
    facing: int  # +1 right, −1 left
    lift: float = 0.0  # height of the lowest point above the floor (jumps)
    lean: float = 0.0  # torso from vertical, + forward
    shoulders: tuple[float, float] = (10.0, -10.0)  # from hanging down, + forward (near, far arm)
    elbows: tuple[float, float] = (20.0, 20.0)
    hips: tuple[float, float] = (5.0, -5.0)  # from straight down, + forward
    knees: tuple[float, float] = (5.0, 5.0)  # bend, the shin swinging back
    rotation: float = 0.0  # whole body about the pelvis, + clockwise on screen

    def blend(self, other: State, t: float) -> State:
        """Linear interpolation towards ``other`` (t = 0: self, 1: other)."""
        def mix(a, b):
            if isinstance(a, tuple):
                return tuple(mix(u, v) for u, v in zip(a, b))
            return a + (b - a) * t
        return State(x=mix(self.x, other.x), facing=other.facing if t >= 0.5 else self.facing,
                     lift=mix(self.lift, other.lift), lean=mix(self.lean, other.lean),
                     shoulders=mix(self.shoulders, other.shoulders), elbows=mix(self.elbows, other.elbows),
                     hips=mix(self.hips, other.hips), knees=mix(self.knees, other.knees),
                     rotation=mix(self.rotation, other.rotation))


def _smooth(t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return t * t * (3 - 2 * t)


def _element_pose(element: str, p: float, x: float, facing: int) -> State:
    """The fault-free pose at phase p ∈ [0, 1) of an element."""
    s2 = math.sin(2 * math.pi * 2 * p)
    if element == "run":
        return State(x, facing, lift=3 * abs(s2), lean=12, shoulders=(-45 * s2, 45 * s2), elbows=(70, 70),
                     hips=(35 * s2, -35 * s2), knees=(10 + 45 * max(-s2, 0), 10 + 45 * max(s2, 0)))
    if element == "jump":
        # Crouch to take off (p < 0.25) and to land (p > 0.8): a bump that rises and falls back.
        crouch = math.sin(math.pi * min(p / 0.25, 1.0)) + math.sin(math.pi * min(max((p - 0.8) / 0.2, 0.0), 1.0))
        flight = math.sin(math.pi * min(max((p - 0.25) / 0.55, 0.0), 1.0))
        arms = 170 * flight
        return State(x, facing, lift=45 * flight, lean=10 * crouch, shoulders=(arms, arms), elbows=(10, 10),
                     hips=(50 * crouch + 20 * flight, 50 * crouch - 10 * flight), knees=(90 * crouch + 30 * flight,
                                                                                          90 * crouch + 30 * flight))
    if element == "turn":
        # A cartwheel-like spin in the picture plane; the floor contact keeps the body on the floor.
        return State(x, facing, lift=6 * math.sin(math.pi * p), shoulders=(95, -95), elbows=(0, 0),
                     hips=(25, -25), knees=(0, 0), rotation=facing * 360 * _smooth((p - 0.1) / 0.8))
    if element == "leap":
        flight = math.sin(math.pi * min(max((p - 0.2) / 0.6, 0.0), 1.0))
        return State(x, facing, lift=35 * flight, lean=8, shoulders=(100 * flight, -60 * flight), elbows=(0, 0),
                     hips=(80 * flight + 20 * s2 * (1 - flight), -80 * flight - 20 * s2 * (1 - flight)),
                     knees=(5, 5 + 20 * (1 - flight)))
    if element == "arms":
        a = 360 * 2 * p
        return State(x, facing, lean=-5, shoulders=(a, a + 180), elbows=(10, 10), hips=(12 * s2, -12 * s2),
                     knees=(8, 8))
    if element == "balance":
        rise = _smooth(p / 0.3) * (1 - _smooth((p - 0.8) / 0.2))
        return State(x, facing, lean=35 * rise, shoulders=(90 * rise + 10, -70 * rise - 10), elbows=(5, 5),
                     hips=(5, -95 * rise - 5), knees=(5, 5 + 10 * (1 - rise)))
    raise ValueError(f"unknown element {element!r}; choose one of {ELEMENTS}")


def base_states(routine: Routine) -> list[State]:
    """The fault-free motion: the pelvis travels at each element's pace and turns round at the range's ends."""
    look = routine.look
    x, direction = look["x0"], look["direction"]
    states = []
    for f in range(routine.n_frames):
        element = routine.elements[f // CLIP]
        states.append(_element_pose(element, (f % CLIP) / CLIP, x, direction))
        x += direction * SPEED[element] * look["pace"]
        if not X_RANGE[0] <= x <= X_RANGE[1]:
            x = min(max(x, X_RANGE[0]), X_RANGE[1])
            direction = -direction
    return states


def _toward_centre(x: float) -> int:
    return 1 if x < SIZE / 2 else -1


def apply_fault(fault: Fault, clip_states: list[State]) -> list[State]:
    """The fault's version of its clip; ``clip_states`` is the clip's fault-free motion (CLIP states)."""
    s = fault.severity
    first, last = clip_states[0], clip_states[-1]
    out = []
    if fault.kind == "wobble":
        amp = 12 + 25 * s
        for i, st in enumerate(clip_states):
            w = math.sin(2 * math.pi * i / 8.0)
            v = math.sin(2 * math.pi * i / 5.0 + 1.0)
            out.append(replace(st, x=st.x + 7 * s * v, rotation=st.rotation + amp * w, lean=st.lean - 0.8 * amp * v,
                               shoulders=(st.shoulders[0] + 90 * v, st.shoulders[1] - 90 * w),
                               knees=(st.knees[0] + 30 * abs(w), st.knees[1] + 30 * abs(v))))
        return out
    if fault.kind == "fall":
        # Tip over towards the middle of the frame (so the lying body stays in the crop), lie, get up.
        side = _toward_centre(first.x)
        lying = State(first.x + 8 * side, first.facing, lean=0, shoulders=(170, 160), elbows=(0, 0), hips=(0, 0), knees=(0, 0),
                      rotation=90 * side)
        # Frames 0–4 falling, then 14–22 frames on the floor (longer when more severe), then getting up.
        down = 5
        up = down + int(round(10 + 12 * s))
        for i in range(CLIP):
            if i < down:
                st = first.blend(lying, _smooth((i + 1) / down))
            elif i < up:
                twitch = math.sin(i * 1.3)
                st = replace(lying, shoulders=(170 + 15 * twitch * s, 160), knees=(20 * max(twitch, 0), 0))
            else:
                st = lying.blend(last, _smooth((i - up + 1) / (CLIP - up)))
            out.append(st)
        return out
    if fault.kind == "underrot":
        # The turn stops short, the figure staggers at that angle, then unwinds backwards to upright.
        reached = 360 * (1 - 0.55 * s)
        for i, st in enumerate(clip_states):
            p = i / CLIP
            turn = first.facing * reached * _smooth((p - 0.1) / 0.5)
            if p >= 0.6:
                stagger = math.sin(2 * math.pi * (p - 0.6) / 0.12) * 15 * (1 - _smooth((p - 0.6) / 0.25))
                turn = first.facing * reached * (1 - _smooth((p - 0.75) / 0.25)) + stagger
            out.append(replace(st, rotation=turn, knees=(st.knees[0] + 50 * s * (p > 0.6), st.knees[1] + 50 * s *
                                                         (p > 0.6)), shoulders=(140, -20) if p > 0.6 else st.shoulders))
        return out
    if fault.kind == "stop":
        hold = int(round(18 + 10 * s))  # frames frozen
        catch_up = CLIP - 2 - hold
        for i in range(CLIP):
            if i < 2:
                st = clip_states[i]
            elif i < 2 + hold:
                st = clip_states[1]
            else:
                st = clip_states[1].blend(clip_states[i], _smooth((i - 1 - hold) / max(catch_up, 1)))
            out.append(st)
        return out
    raise ValueError(f"unknown fault kind {fault.kind!r}; choose one of {FAULT_KINDS}")


def routine_states(routine: Routine) -> list[State]:
    states = base_states(routine)
    for fault in routine.faults:
        a, b = fault.frames
        states[a:b + 1] = apply_fault(fault, states[a:b + 1])
    return states


# -------------------------------------------------------------------------------------------------- drawing


def _joints(st: State) -> dict[str, np.ndarray]:
    """Joint positions in pixels, relative to the pelvis, before the floor contact is applied."""
    d = st.facing

    def down(angle: float) -> np.ndarray:  # a unit vector `angle` degrees forward of straight down
        r = math.radians(angle)
        return np.array([d * math.sin(r), math.cos(r)])

    pelvis = np.zeros(2)
    neck = pelvis - down(st.lean) * TORSO  # the torso points up: the opposite of "down, leaned"
    head = neck - down(st.lean) * (NECK + HEAD_R)
    j = {"pelvis": pelvis, "neck": neck, "head": head}
    for side in (0, 1):
        elbow = neck + down(st.shoulders[side]) * UPPER_ARM
        j[f"elbow{side}"] = elbow
        j[f"hand{side}"] = elbow + down(st.shoulders[side] - st.elbows[side]) * FOREARM
        knee = pelvis + down(st.hips[side]) * THIGH
        j[f"knee{side}"] = knee
        j[f"foot{side}"] = knee + down(st.hips[side] - st.knees[side]) * SHIN
    r = math.radians(st.rotation)
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    return {k: rot @ v for k, v in j.items()}


def background(look: dict) -> np.ndarray:
    """A wall with vertical panels over a floor with a mat: static, so only the figure moves."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = look["wall"]
    panel = SIZE // look["panels"]
    for k in range(0, look["panels"], 2):
        img[:FLOOR, k * panel:(k + 1) * panel] = np.clip(np.array(look["wall"]) - 25, 0, 255)
    img[FLOOR:] = look["floor"]
    img[FLOOR + 8:FLOOR + 12, CROP[0] + 8:CROP[1] - 8] = np.clip(np.array(look["floor"]) + 60, 0, 255)
    return img


def draw(st: State, look: dict, bg: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageDraw

    joints = _joints(st)
    # Floor contact: the lowest point of the body (limb half-width and head included) rests on the floor + lift.
    lowest = max(max(v[1] for k, v in joints.items() if k != "head") + LIMB_W / 2, joints["head"][1] + HEAD_R)
    # Keep the body inside the I3D centre crop: a pose that would leave it (a raised leg or arms at the edge of
    # the travel range) is slid back in. It depends on this frame's state alone, so clips stay independent.
    left = min(min(v[0] for v in joints.values()) - LIMB_W / 2, joints["head"][0] - HEAD_R) + st.x
    right = max(max(v[0] for v in joints.values()) + LIMB_W / 2, joints["head"][0] + HEAD_R) + st.x
    slide = max(CROP[0] + 4 - left, 0.0) + min(CROP[1] - 5 - right, 0.0)
    offset = np.array([st.x + slide, FLOOR - st.lift - lowest])
    pts = {k: tuple((v + offset).tolist()) for k, v in joints.items()}
    img = Image.fromarray(bg)
    canvas = ImageDraw.Draw(img)
    # A shadow under the body, shrinking as it rises, so jumps and falls read as height.
    sx = offset[0] + (joints["neck"][0] + joints["pelvis"][0]) / 2
    half = 30 * (1 - min(st.lift, 60) / 120)
    canvas.ellipse([sx - half, FLOOR + 1, sx + half, FLOOR + 6], fill=tuple(max(c - 45, 0) for c in look["floor"]))
    body, far = look["body"], tuple(int(c * 0.6) for c in look["body"])
    limbs = [(("neck", "elbow1", "hand1"), far), (("pelvis", "knee1", "foot1"), far),
             (("pelvis", "neck"), body), (("pelvis", "knee0", "foot0"), body), (("neck", "elbow0", "hand0"), body)]
    for chain, colour in limbs:
        canvas.line([pts[k] for k in chain], fill=colour, width=LIMB_W, joint="curve")
        for k in chain:  # round ends, so limbs do not look like cut sticks
            x, y = pts[k]
            canvas.ellipse([x - LIMB_W / 2, y - LIMB_W / 2, x + LIMB_W / 2, y + LIMB_W / 2], fill=colour)
    hx, hy = pts["head"]
    canvas.ellipse([hx - HEAD_R, hy - HEAD_R, hx + HEAD_R, hy + HEAD_R], fill=body)
    return np.asarray(img)


def render(routine: Routine) -> Iterator[np.ndarray]:
    """The routine's frames, uint8 RGB [SIZE, SIZE, 3], faults included."""
    bg = background(routine.look)
    for st in routine_states(routine):
        yield draw(st, routine.look, bg)


def write_routine(routine: Routine, path: str | Path, *, crf: int = 23) -> Path:
    """Encode as H.264 (yuv420p) at 25 fps with PyAV; the file is written whole or not at all."""
    import shutil
    import tempfile

    from aqa_cli.synthetic import write_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A private folder beside the target (mkdtemp: mode 0700, a fresh name), renamed over it when complete. The
    # temporary keeps the .mp4 suffix so PyAV picks the container from it.
    folder = Path(tempfile.mkdtemp(prefix=".routine-tmp-", dir=path.parent))
    try:
        write_video(folder / path.name, render(routine), FPS, crf=crf)
        (folder / path.name).replace(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------------ samples and sets

# The committed samples: fixed seeds, a fall planted in the middle clip of seven, and a clean routine.
SAMPLES = {
    "routine_fall": (7, 7, (Fault("fall", 3, 0.9),)),
    "routine_clean": (11, 6, ()),
}
TRAIN_SEED0 = 1000  # training routines use seeds 1000, 1001, …: disjoint from the samples' seeds


def sample_routines() -> dict[str, Routine]:
    return {name: plan_routine(seed, n_clips=n, faults=faults) for name, (seed, n, faults) in SAMPLES.items()}


def write_labels(labels: list[dict], out: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` with every detail and ``<stem>.csv`` in the form `aqa train` reads (id, score, …)."""
    from aqa_cli.fileio import write_json, write_text

    js = write_json(out / f"{stem}.json", {"description": "synthetic routines for the aqa demo head, not real sport",
                                           "deductions": DEDUCTIONS, "base_score": BASE_SCORE,
                                           "score_noise_std": SCORE_NOISE, "clip_frames": CLIP, "fps": FPS,
                                           "videos": labels})
    rows = ["id,score,n_clips,n_faults,fault_clips,faults"]
    for lab in labels:
        faults = lab["faults"]
        rows.append(",".join([lab["id"], f"{lab['score']:.3f}", str(lab["n_clips"]), str(len(faults)),
                              " ".join(str(f["clip"]) for f in faults) or "-",
                              " ".join(f"{f['kind']}@{f['clip']}:{f['severity']:.2f}" for f in faults) or "-"]))
    text = "\n".join(rows) + "\n"
    csv = write_text(out / f"{stem}.csv", text)
    return js, csv


def make_samples(out: Path = HERE) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    labels, paths = [], []
    for name, routine in sample_routines().items():
        paths.append(write_routine(routine, out / f"{name}.mp4"))
        labels.append(routine.label(name))
    write_labels(labels, out, "routines")
    return paths


def make_train_set(n: int, out: Path) -> list[Path]:
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    labels, paths = [], []
    for k in range(n):
        routine = plan_routine(TRAIN_SEED0 + k)
        name = f"routine_{TRAIN_SEED0 + k}"
        paths.append(write_routine(routine, videos / f"{name}.mp4"))
        labels.append(routine.label(name))
    write_labels(labels, out, "labels")
    return paths


def extract(videos: list[Path], out: Path) -> None:
    from aqa_cli.backbones import create_backbone
    from aqa_cli.extract import extract_to_folder

    from aqa_cli.fileio import sha256_file

    # aqa's resume trusts finished feature files; features of a video that has since been re-rendered differently
    # (after a change to this script) are stale, so they go first.
    for video in videos:
        sidecar = out / f"{video.stem}.json"
        if sidecar.is_file() and json.loads(sidecar.read_text()).get("video_sha256") != sha256_file(video):
            sidecar.unlink()
            (out / f"{video.stem}.npy").unlink(missing_ok=True)
    backbone = create_backbone("i3d", device="cpu")
    outcomes = extract_to_folder(videos, backbone, out)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise SystemExit(f"{len(failed)} video(s) failed, e.g. {failed[0].error}")


def train(features: Path, labels: Path, out: Path) -> dict:
    from aqa_cli.training import TrainJob, run_train_job

    job = TrainJob(features=str(features), labels=str(labels), target="score", head="interp", out=str(out),
                   preset="demo", seed=0, folds=5, final="folds", half=True)
    return run_train_job(job)


def main(argv: Sequence[str] | None = None) -> None:
    import time

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", action="store_true", help="re-render the committed samples into samples/")
    parser.add_argument("--train-set", type=int, metavar="N", help="render N training routines into OUT/videos")
    parser.add_argument("--out", type=Path, help="folder for the training set (keep it outside the repository)")
    parser.add_argument("--extract", action="store_true", help="then extract their I3D features into OUT/features")
    parser.add_argument("--train", type=Path, metavar="CHECKPOINT", help="then train the demo head into CHECKPOINT")
    args = parser.parse_args(argv)
    if not args.samples and args.train_set is None:
        parser.error("give --samples and/or --train-set N --out DIR")
    if args.samples:
        t = time.process_time()
        for path in make_samples():
            print(f"wrote {path} ({path.stat().st_size} bytes)")
        print(f"samples: {time.process_time() - t:.1f} s CPU")
    if args.train_set is not None:
        if args.out is None:
            parser.error("--train-set needs --out DIR")
        t = time.process_time()
        videos = make_train_set(args.train_set, args.out)
        print(f"rendered {len(videos)} routines into {args.out / 'videos'}: {time.process_time() - t:.1f} s CPU")
        if args.extract or args.train:
            t = time.process_time()
            extract(videos, args.out / "features")
            print(f"extracted I3D features into {args.out / 'features'}: {time.process_time() - t:.1f} s CPU")
        if args.train:
            t = time.process_time()
            log = train(args.out / "features", args.out / "labels.csv", args.train)
            cv = log["cv"]
            print(f"trained {args.train}: CV ρ {cv['mean_spearman']:.3f} ± {cv['std_spearman']:.3f}, "
                  f"{time.process_time() - t:.1f} s CPU")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
    main()
