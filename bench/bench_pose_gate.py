"""The pose backbone's plausibility gate: its measures on real people and on phantoms, and what it keeps.

Cases (64-frame synthetic ones at 25 fps):

* real: ``arm_wrestling.mp4`` and ``flipping_a_pancake.mkv`` (``../shared/videos``), and copies of both turned
  by 90°, 180° and 270°, mirrored, and shrunk to 35% in a grey frame, because an athlete may be upside down,
  lying or small;
* phantom: ``synthetic.moving_scene`` at 11 seeds and sizes, and ``samples/moving_disc.mp4``, its bundled
  sample: random block texture, on which BlazePose places a body in most frames;
* other: the bundled stick-figure routines, a plain grey frame, pixel noise.

Every case is extracted twice with the real pose backbone: with the gate switched off (every body BlazePose
places, measured with ``body_measures``) and with it on (frames with a person, frames refused). Prints a table
per case, the measures' percentiles and what each check flags, and writes ``bench/out/pose_gate.json``
(``pose_gate-only-KIND.json`` with ``--only KIND``, one kind of case).

Run: ``PYTHONPATH=.:<mediapipe folder> OMP_NUM_THREADS=1 python bench/bench_pose_gate.py`` (~4 min on 2 cores).
The videos are cached under ``bench/out/gate_videos``. x264 does not always encode the small textures to the
same bytes, and BlazePose's result moves with the encode (6 to 13 frames of 64 with a person at 320x176, for
the same scene), so the figures are those of the cached files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from _common import OUT_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "videos"
VIDEOS = OUT_DIR / "gate_videos"
# (seed, height, width): the default size, the test suite's small one and three others; widths are multiples of 8,
# as moving_scene's blocks need.
TEXTURES = ((0, 360, 640), (1, 360, 640), (12, 360, 640), (20, 360, 640), (21, 360, 640), (0, 176, 320),
            (10, 176, 320), (11, 176, 320), (2, 240, 320), (13, 240, 424), (3, 480, 640))


def _transformed(src: Path, name: str, fn) -> Path:
    """``src`` with every frame passed through ``fn``, at its own frame rate (even sizes for 4:2:0)."""
    import av

    from aqa_cli.synthetic import write_video

    out = VIDEOS / f"{name}.mp4"
    if not out.is_file():
        with av.open(str(src)) as c:
            fps = float(c.streams.video[0].average_rate)
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        turned = [fn(a) for a in frames]
        write_video(out, [np.ascontiguousarray(a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2]) for a in turned], fps)
    return out


def _shrunk(frame: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = frame.shape[:2]
    small = np.asarray(Image.fromarray(frame).resize((int(w * 0.35) // 2 * 2, int(h * 0.35) // 2 * 2)))
    out = np.full((h, w, 3), 110, np.uint8)
    y, x = (h - small.shape[0]) // 2, (w - small.shape[1]) // 3
    out[y:y + small.shape[0], x:x + small.shape[1]] = small
    return out


def cases() -> dict[str, tuple[str, Path]]:
    """name → (kind, video), kind one of real, phantom, other."""
    from aqa_cli.synthetic import moving_scene, write_video

    VIDEOS.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[str, Path]] = {}
    for stem, file in (("arm", "arm_wrestling.mp4"), ("pancake", "flipping_a_pancake.mkv")):
        src = SHARED_VIDEOS / file
        if not src.is_file():
            sys.exit(f"{src} is absent: the real cases need ../shared/videos")
        out[stem] = ("real", src)
        for tag, fn in (("rot90", lambda a: np.rot90(a, 1)), ("rot180", lambda a: a[::-1, ::-1]),
                        ("rot270", lambda a: np.rot90(a, 3)), ("mirror", lambda a: a[:, ::-1]), ("small", _shrunk)):
            out[f"{stem}-{tag}"] = ("real", _transformed(src, f"{stem}-{tag}", fn))
    for seed, h, w in TEXTURES:
        path = VIDEOS / f"texture-s{seed}-{w}x{h}.mp4"
        if not path.is_file():
            write_video(path, moving_scene(64, h, w, seed), 25.0)
        out[path.stem] = ("phantom", path)
    out["moving_disc"] = ("phantom", REPO / "samples" / "moving_disc.mp4")
    for name in ("routine_fall", "routine_clean"):
        out[name] = ("other", REPO / "samples" / f"{name}.mp4")
    for name, frame in (("plain", lambda rng: np.full((176, 320, 3), 90, np.uint8)),
                        ("noise", lambda rng: rng.integers(0, 256, (360, 640, 3), dtype=np.uint8))):
        path = VIDEOS / f"{name}.mp4"
        if not path.is_file():
            rng = np.random.default_rng(5)
            write_video(path, [frame(rng) for _ in range(64)], 25.0)
        out[name] = ("other", path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("real", "phantom", "other"), help="one kind of case")
    args = parser.parse_args()
    from aqa_cli.backbones import create_backbone
    from aqa_cli.backbones import pose
    from aqa_cli.extract import video_features

    bb = create_backbone("pose", device="cpu")
    gate = pose.plausible_body
    rows, measures = {}, {"real": [], "phantom": []}
    for name, (kind, video) in cases().items():
        if args.only and kind != args.only:
            continue
        pose.plausible_body = lambda world: np.ones(np.shape(world)[:-2], dtype=bool)  # every body passes
        raw = video_features(video, bb).frames
        pose.plausible_body = gate
        gated = video_features(video, bb).frames
        person = raw["person"].reshape(-1)
        bodies = raw["world"].reshape(-1, pose.N_LANDMARKS, 3)[person]
        if kind in measures:
            measures[kind].append(pose.body_measures(bodies))
        rows[name] = {"kind": kind, "frames": int(person.size), "found_without_gate": int(person.sum()),
                      "failing_gate_without_gate": int((~gate(bodies)).sum()),
                      "person": int(gated["person"].sum()), "rejected": int(gated["rejected"].sum())}
        r = rows[name]
        print(f"{name:22s} {kind:8s} frames {r['frames']:4d}  found without gate {r['found_without_gate']:4d} "
              f"(failing it {r['failing_gate_without_gate']:3d})  with gate: person {r['person']:4d}, "
              f"refused {r['rejected']:3d}", flush=True)

    checks = {"torso_to_limb": (pose.MIN_TORSO_TO_LIMB, np.less), "end_on": (pose.MAX_END_ON, np.greater),
              "nose_m": (pose.MIN_NOSE_M, np.less)}
    summary = {}
    pooled = {kind: {k: np.concatenate([m[k] for m in ms]) for k in checks} for kind, ms in measures.items() if ms}
    if len(pooled) < 2:
        pooled = {}  # the measures' summary needs both real and phantom cases
    for k, (threshold, fails) in checks.items() if pooled else ():
        real, phantom = pooled["real"][k], pooled["phantom"][k]
        summary[k] = {"threshold": threshold,
                      "real_percentiles_1_50_99": np.percentile(real, [1, 50, 99]).round(3).tolist(),
                      "phantom_percentiles_5_50_95": np.percentile(phantom, [5, 50, 95]).round(3).tolist(),
                      "real_flagged": int(fails(real, threshold).sum()),
                      "phantom_flagged_share": round(float(fails(phantom, threshold).mean()), 3)}
        s = summary[k]
        print(f"{k:14s} threshold {threshold}: real p1/p50/p99 {s['real_percentiles_1_50_99']}, phantom p5/p50/p95 "
              f"{s['phantom_percentiles_5_50_95']}; flags {s['real_flagged']} of {len(real)} real frames, "
              f"{s['phantom_flagged_share']:.1%} of {len(phantom)} phantom frames")
    if pooled:
        flagged = {kind: np.any([fails(pooled[kind][k], t) for k, (t, fails) in checks.items()], axis=0)
                   for kind in pooled}
        summary["all_checks"] = {"real_flagged": int(flagged["real"].sum()),
                                 "phantom_flagged_share": round(float(flagged["phantom"].mean()), 3)}
        print(f"all three: flag {flagged['real'].sum()} of {flagged['real'].size} real frames, "
              f"{flagged['phantom'].mean():.1%} of {flagged['phantom'].size} phantom frames (before tracker restarts)")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"-{k.replace('_', '-')}-{v}" for k, v in vars(args).items() if v is not None)
    out = OUT_DIR / f"pose_gate{tag}.json"
    out.write_text(json.dumps({"cases": rows, "measures": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
