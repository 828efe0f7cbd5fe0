"""Benchmark I3D feature extraction: throughput and peak memory, ours against a naive loop.

What is measured
----------------
* **ours**: ``aqa_cli.extract.video_features(path, backbone, batch_size=B)``, the
  streaming pipeline (decode in a prefetch thread, shrink each chunk at once,
  drop frames once the last clip that needs them is built, B clips per forward).
* **naive**: what one writes without thinking about memory: decode *every*
  frame with one decord ``get_batch``, transform them all, normalise them all
  to float32, then run one clip per forward pass (batch 1).

Each measurement runs in a fresh Python subprocess
(``python bench/bench_extract.py --worker MODE VIDEO``) so that peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that run alone. A worker
loads the backbone, runs one untimed warm-up forward, then times the extraction
only and prints one JSON line. The parent generates (and caches) synthetic
640x360 25 fps videos under ``bench/out/videos/``, runs the workers, prints a
table and writes every figure plus machine information to
``bench/out/extract.json``.

The machine is noisy, so the figures to quote are ratios:

* ``ours/naive clips/s ratio`` on the main video (default 60 s);
* ``RSS 120s/30s ratio`` of our pipeline, which must stay below 1.10
  (memory must not grow with video length); the naive loop's ratio is shown
  next to it and is expected to grow.

Run (weights are fetched into $AQA_HOME on first use)::

    python bench/bench_extract.py                 # full run, ~10 min on a small CPU
    python bench/bench_extract.py --quick         # 8 s / 16 s videos, smoke test
    python bench/bench_extract.py --device cuda --batch-size 8

The exit status is 1 when the RSS check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import FPS, HEIGHT, OUT_DIR, WIDTH, cpu_model, video_for

RSS_LIMIT = 1.10
MODES = ("ours", "naive")


# ------------------------------------------------------------------------------------------------- worker side


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS; this benchmark targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_ours(video: Path, backbone, batch_size: int):  # -> (features, extra)
    from aqa_cli.extract import video_features

    result = video_features(video, backbone, batch_size=batch_size)
    return result.features, {"decoder": result.info.decoder}


def _run_naive(video: Path, backbone):  # -> (features, extra)
    """Whole video in memory first, then one clip per forward pass."""
    import numpy as np
    import torch

    from aqa_cli.extract import plan_for
    from aqa_cli.video import open_video

    recipe = backbone.recipe
    phases: dict[str, float] = {}
    t = time.perf_counter()
    # The same clip plan as ours, so both runs compute the same clips; forcing decord
    # and asking for every frame in one chunk makes iter_chunks a single get_batch.
    with open_video(video, decoder="decord") as reader:
        plan = plan_for(reader, recipe)
        every = list(range(reader.info.num_frames))
        (_, frames), = reader.iter_chunks(every, chunk_size=len(every))
    phases["decode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    frames = recipe.transform_frames(frames)  # uint8 [N, h, w, 3]
    x = recipe.normalize(torch.from_numpy(frames)[None])  # float32 [1, 3, N, h, w]
    phases["transform_normalize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    feats = []
    with torch.inference_mode():
        for clip in plan.clips:
            idx = torch.as_tensor(clip.source_indices)
            out = backbone.model(x[:, :, idx].to(backbone.device))
            feats.append(out.features.float().cpu().numpy())
    phases["forward_s"] = time.perf_counter() - t
    return np.concatenate(feats), {"decoder": "decord", "phases": phases}


def worker(mode: str, video: Path, device: str, batch_size: int, features_out: Path | None) -> None:
    """Measure one extraction and print its figures as one JSON line on stdout."""
    import numpy as np
    import torch

    from aqa_cli.backbones import create_backbone

    t = time.perf_counter()
    backbone = create_backbone("i3d", device=device)
    load_s = time.perf_counter() - t

    # One untimed forward: the first call pays for kernel selection and allocator growth,
    # which is a per-process cost, not a per-video one. Both modes get the same warm-up.
    h, w = backbone.recipe.input_size
    backbone(np.zeros((1, backbone.recipe.clip_len, h, w, 3), dtype=np.uint8))

    t = time.perf_counter()
    if mode == "ours":
        features, extra = _run_ours(video, backbone, batch_size)
    else:
        features, extra = _run_naive(video, backbone)
    wall_s = time.perf_counter() - t

    if features_out is not None:
        np.save(features_out, features)
    clips = int(features.shape[0])
    print(json.dumps({
        "mode": mode,
        "video": str(video),
        "batch_size": batch_size if mode == "ours" else 1,
        "clips": clips,
        "wall_s": wall_s,
        "clips_per_s": clips / wall_s,
        "peak_rss_mib": _peak_rss_mib(),
        "load_s": load_s,
        "device": str(backbone.device),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }))


# ------------------------------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class Run:
    mode: str
    seconds: float



def measure(run: Run, args: argparse.Namespace) -> dict:
    video = video_for(run.seconds)
    feats = OUT_DIR / f"features_{run.mode}_{run.seconds:g}s.npy"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run.mode, str(video),
           "--device", args.device, "--batch-size", str(args.batch_size), "--features-out", str(feats)]
    print(f"running {run.mode} on {run.seconds:g} s ...", file=sys.stderr, flush=True)
    # stderr passes through (warnings, errors); stdout carries the worker's JSON line.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {run.mode} on {video.name} failed with exit status {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = run.seconds
    result["features_file"] = str(feats)
    return result


def machine_info(sample: dict) -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        # Reported by a worker, so the parent does not need to import torch.
        "torch_version": sample["torch_version"],
        "torch_threads": sample["torch_threads"],
        "device": sample["device"],
    }


def print_table(results: list[dict]) -> None:
    header = ["mode", "video", "batch", "clips", "wall s", "clips/s", "peak RSS MiB"]
    rows = [[r["mode"], f"{r['seconds']:g} s", str(r["batch_size"]), str(r["clips"]), f"{r['wall_s']:.1f}",
             f"{r['clips_per_s']:.3f}", f"{r['peak_rss_mib']:.0f}"] for r in results]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c) for c in col) for col in zip(header, *rows)]
        for row in [header, *rows]:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        return
    table = Table(title="I3D extraction")
    for name in header:
        table.add_column(name, justify="left" if name == "mode" else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def orchestrate(args: argparse.Namespace) -> int:
    short, long = sorted(args.rss_seconds)
    # One run per (mode, length): the main video is reused when it is also an RSS length.
    plan = [Run(m, s) for s in dict.fromkeys([args.seconds, short, long]) for m in MODES]
    results = {run: measure(run, args) for run in plan}

    import numpy as np

    ours, naive = results[Run("ours", args.seconds)], results[Run("naive", args.seconds)]
    # Sanity check that both loops computed the same thing (batching changes the last bits only).
    diff = float(np.abs(np.load(ours["features_file"]) - np.load(naive["features_file"])).max())
    speed_ratio = ours["clips_per_s"] / naive["clips_per_s"]
    rss_ours = results[Run("ours", long)]["peak_rss_mib"] / results[Run("ours", short)]["peak_rss_mib"]
    rss_naive = results[Run("naive", long)]["peak_rss_mib"] / results[Run("naive", short)]["peak_rss_mib"]
    passed = rss_ours <= RSS_LIMIT

    print_table(list(results.values()))
    print(f"ours/naive clips/s ratio ({args.seconds:g} s video): {speed_ratio:.2f}")
    print(f"RSS {long:g}s/{short:g}s ratio (ours): {rss_ours:.3f}  {'PASS' if passed else 'FAIL'} (limit {RSS_LIMIT})")
    print(f"RSS {long:g}s/{short:g}s ratio (naive, expected to grow): {rss_naive:.3f}")
    print(f"max |ours - naive| feature difference: {diff:.2e}")

    report = {
        "benchmark": "extract",
        "settings": {"seconds": args.seconds, "rss_seconds": [short, long], "batch_size": args.batch_size,
                     "device": args.device, "quick": args.quick, "video": f"{WIDTH}x{HEIGHT} {FPS:g} fps synthetic"},
        "machine": machine_info(ours),
        "runs": list(results.values()),
        "ratios": {"ours_over_naive_clips_per_s": speed_ratio,
                   "rss_long_over_short_ours": rss_ours,
                   "rss_long_over_short_naive": rss_naive},
        "rss_check": {"limit": RSS_LIMIT, "passed": passed},
        "max_feature_abs_diff": diff,
    }
    out = OUT_DIR / "extract.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if passed else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("MODE", "VIDEO"), help="internal: measure one run, print JSON")
    p.add_argument("--features-out", type=Path, help="internal: where a worker saves its features")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per forward for our pipeline (default 4)")
    p.add_argument("--seconds", type=float, help="length of the throughput video (default 60; 8 with --quick)")
    p.add_argument("--rss-seconds", type=float, nargs=2, metavar=("SHORT", "LONG"),
                   help="the two lengths compared for peak RSS (default 30 120; 8 16 with --quick)")
    p.add_argument("--quick", action="store_true", help="short videos, to smoke-test the script")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 8.0 if args.quick else 60.0
    if args.rss_seconds is None:
        args.rss_seconds = [8.0, 16.0] if args.quick else [30.0, 120.0]
    if args.worker and args.worker[0] not in MODES:
        p.error(f"worker mode must be one of {MODES}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        mode, video = args.worker
        worker(mode, Path(video), args.device, args.batch_size, args.features_out)
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
