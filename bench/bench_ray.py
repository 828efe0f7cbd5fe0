"""Benchmark ``aqa extract-features --engine ray`` against the local engine, and the figures of the scaling plan.

What is measured
----------------
* **Throughput.** The real command in a fresh subprocess per run (``python -m aqa_cli extract-features
  DIR --out OUT [--engine ray ...]``, I3D, fp32, CPU), on folders of N1 and N2 synthetic 640x360 25 fps
  videos of two clips each. Wall time = a + b·N: the slope b (seconds per video) gives videos/s = 1/b
  without the start-up, and the intercept a is the start-up (Python, torch, the backbone, and for Ray
  the instance and its workers). Configurations: the local engine; Ray with 1 worker (the local
  engine's thread count); Ray with 2 workers of 1 torch thread (the two cores split); Ray with 2
  workers at the local engine's thread count (oversubscribed on 2 cores).
* **Ray's overhead** per video: b(Ray, 1 worker) − b(local), and once per run: a(Ray, 1 worker) − a(local).
* **Decode per core**: frames per second of decode + the I3D recipe's resize and crop (no model), in a
  subprocess pinned to one CPU with one torch thread, on 640x360 and 1280x720 synthetic videos.
* **Bytes per video**: the feature file and sidecar per clip (from the outputs), the video per second
  (the synthetic videos, and the real ones in ../shared when present), and what goes through Ray's
  object store per video (the pickled job and outcome).

Every Ray run's outputs are compared with the local engine's, byte for byte (exit status 1 otherwise).
The machine is shared and noisy: quote ratios from one run. Writes ``bench/out/ray.json``.

Run::

    python bench/bench_ray.py            # N = 2 and 8 videos (~5–10 min on a 2-core CPU)
    python bench/bench_ray.py --quick    # N = 1 and 3
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import FPS, HEIGHT, OUT_DIR, WIDTH, cpu_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's aqa_cli, as the subprocesses (cwd = REPO) import it
CLIP_FRAMES = 64  # two 32-frame clips per video
CONFIGS = {
    "local": [],
    "ray-1w": ["--engine", "ray", "--workers", "1"],
    "ray-2w-1t": ["--engine", "ray", "--workers", "2", "--threads-per-worker", "1"],
    "ray-2w-local-threads": ["--engine", "ray", "--workers", "2"],
}


def _videos(n: int) -> Path:
    """A folder of n synthetic videos (cached; the first n of the same set)."""
    from aqa_cli.synthetic import moving_scene, write_video

    pool = OUT_DIR / "ray" / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    folder = OUT_DIR / "ray" / f"videos-{n}"
    if folder.is_dir() and len(list(folder.glob("*.mp4"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for k in range(n):
        src = pool / f"v{k:03d}.mp4"
        if not src.is_file():
            tmp = pool / f"partial-v{k:03d}.mp4"
            write_video(tmp, moving_scene(CLIP_FRAMES, HEIGHT, WIDTH, seed=k), FPS)
            os.replace(tmp, src)
        os.link(src, folder / src.name)
    return folder


def _run(config: str, videos: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "aqa_cli", "extract-features", str(videos), "--out", str(out), *CONFIGS[config]]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{config} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return wall


def _same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _decode_worker(path: str) -> None:
    """Decode + the I3D recipe's transform, no model, on one CPU with one torch thread; prints JSON."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch

    torch.set_num_threads(1)
    from aqa_cli.backbones.i3d import BACKBONE
    from aqa_cli.extract import iter_clip_batches, plan_for
    from aqa_cli.video import open_video

    recipe = BACKBONE.recipe
    t0 = time.perf_counter()
    frames = 0
    with open_video(path) as reader:
        plan = plan_for(reader, recipe)
        for clips, batch in iter_clip_batches(reader, plan, recipe, batch_size=4):
            frames += batch.shape[0] * batch.shape[1]
        source = reader.info.num_frames
    seconds = time.perf_counter() - t0
    print(json.dumps({"clip_frames": frames, "source_frames": source, "seconds": seconds}))


def _decode_rate(width: int, height: int, frames: int) -> dict:
    from aqa_cli.synthetic import moving_scene, write_video

    path = OUT_DIR / "ray" / f"decode_{width}x{height}_{frames}.mp4"
    if not path.is_file():
        write_video(path, moving_scene(frames, height, width, seed=7), FPS)
    res = subprocess.run([sys.executable, __file__, "--decode-worker", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    if res.returncode != 0:
        sys.exit(res.stderr[-2000:])
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec["frames_per_s"] = rec["source_frames"] / rec["seconds"]
    rec["bytes_per_s_of_video"] = path.stat().st_size / (frames / FPS)
    return rec


def _video_bytes_per_s(path: Path) -> dict:
    from aqa_cli.video import open_video

    with open_video(path) as reader:
        info = reader.info
    seconds = info.num_frames / info.fps
    return {"file": path.name, "size": f"{info.width}x{info.height}", "fps": round(info.fps, 3),
            "seconds": round(seconds, 2), "bytes_per_s": round(path.stat().st_size / seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, nargs=2, default=[2, 8], metavar=("N1", "N2"))
    ap.add_argument("--quick", action="store_true", help="N = 1 and 3")
    ap.add_argument("--decode-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.decode_worker:
        _decode_worker(args.decode_worker)
        return
    n1, n2 = (1, 3) if args.quick else args.videos
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", file=sys.stderr)

    walls: dict[str, dict[int, float]] = {c: {} for c in CONFIGS}
    identical = True
    for n in (n1, n2):
        videos = _videos(n)
        for config in CONFIGS:
            out = OUT_DIR / "ray" / f"out-{config}-{n}"
            walls[config][n] = _run(config, videos, out)
            print(f"{config:22s} {n:2d} videos: {walls[config][n]:6.1f} s", file=sys.stderr, flush=True)
            if config != "local":
                identical &= _same_bytes(out, OUT_DIR / "ray" / f"out-local-{n}")
    fits = {}
    for config, w in walls.items():
        slope = (w[n2] - w[n1]) / (n2 - n1)
        fits[config] = {"walls": w, "s_per_video": slope, "videos_per_s": 1 / slope, "startup_s": w[n1] - slope * n1}
    loc, r1 = fits["local"], fits["ray-1w"]
    result = {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_after": os.getloadavg()[0]},
        "videos": [n1, n2], "clips_per_video": CLIP_FRAMES // 32, "video": f"{WIDTH}x{HEIGHT} {FPS:g} fps",
        "fits": fits,
        "ratio_2w_1t_over_1w": fits["ray-2w-1t"]["videos_per_s"] / r1["videos_per_s"],
        "ratio_2w_local_threads_over_1w": fits["ray-2w-local-threads"]["videos_per_s"] / r1["videos_per_s"],
        "ray_overhead_s_per_video": r1["s_per_video"] - loc["s_per_video"],
        "ray_overhead_share_per_video": r1["s_per_video"] / loc["s_per_video"] - 1,
        "ray_startup_overhead_s": r1["startup_s"] - loc["startup_s"],
        "outputs_identical_to_local": identical,
    }

    # Bytes per video: features and sidecar per clip, video per second, object-store traffic per video.
    from aqa_cli.extract import ExtractOutcome, VideoJob

    out = OUT_DIR / "ray" / f"out-local-{n2}"
    clips = sum(json.loads(p.read_text())["shape"][0] for p in out.glob("*.json"))
    npy = sum(p.stat().st_size for p in out.glob("*.npy"))
    side = sum(p.stat().st_size for p in out.glob("*.json"))
    job = VideoJob(Path("/shared/videos/routine_0001.mp4"), Path("/shared/features/routine_0001.npy"),
                   Path("/shared/features/routine_0001.json"))
    outcome = ExtractOutcome(job.video, "extracted", job.features_path, job.sidecar_path, clips=141,
                             warnings=["a warning of about eighty characters, as the recipe's warnings are, say"])
    result["bytes"] = {
        "features_per_clip": npy / clips, "sidecar_per_clip": side / clips,
        "object_store_per_video": len(pickle.dumps(job)) + len(pickle.dumps(outcome)),
        "videos": [_video_bytes_per_s(p) for p in sorted((REPO.parent / "shared" / "videos").glob("*"))
                   if p.suffix in (".mp4", ".mkv")],
    }
    result["decode_per_core"] = {"640x360": _decode_rate(640, 360, 250), "1280x720": _decode_rate(1280, 720, 250)}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "ray.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n| configuration | wall {n1} videos (s) | wall {n2} videos (s) | s/video | videos/s | start-up (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for config, f in fits.items():
        print(f"| {config} | {f['walls'][n1]:.1f} | {f['walls'][n2]:.1f} | {f['s_per_video']:.2f} | "
              f"{f['videos_per_s']:.3f} | {f['startup_s']:.1f} |")
    print(f"\nvideos/s, 2 workers x 1 thread / 1 worker: {result['ratio_2w_1t_over_1w']:.2f}; "
          f"2 workers at the local thread count / 1 worker: {result['ratio_2w_local_threads_over_1w']:.2f}")
    print(f"Ray overhead per video: {result['ray_overhead_s_per_video']:+.2f} s "
          f"({100 * result['ray_overhead_share_per_video']:+.0f}% of the local engine's s/video); "
          f"once per run: {result['ray_startup_overhead_s']:+.1f} s")
    b = result["bytes"]
    print(f"features {b['features_per_clip']:.0f} B/clip, sidecar {b['sidecar_per_clip']:.0f} B/clip, "
          f"object store {b['object_store_per_video']} B/video")
    for v in b["videos"]:
        print(f"video {v['file']} ({v['size']}, {v['fps']} fps): {v['bytes_per_s']} B/s")
    for size, d in result["decode_per_core"].items():
        print(f"decode + I3D resize/crop, one core, {size}: {d['frames_per_s']:.0f} frames/s")
    print(f"outputs identical to the local engine's: {identical}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
