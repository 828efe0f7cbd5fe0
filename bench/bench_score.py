"""Benchmark `aqa score` end to end: wall time, peak memory, and where the time goes.

What is measured
----------------
Each case runs in a fresh Python subprocess (``python bench/bench_score.py --worker
VIDEO HEAD``), which calls the real command in-process,
``aqa score VIDEO --weights HEAD --json`` (typer's ``app(..., standalone_mode=False)``),
twice with a feature cache of its own that starts empty:

1. **first score**: decode, I3D, head, cache write, JSON out;
2. **re-score with another head**: the features now come from the cache.

During the first call, hooks time the parts without changing them: the backbone's
construction (weights loaded and verified), every I3D forward pass (a forward pre-hook
and hook on the model), and every head forward. Everything else (probing, hashing,
the decode that the prefetch thread does *not* hide behind the forward passes, clip
assembly, cache and JSON writes) is the rest. Decoding on its own (the same clips,
no model) is timed in a separate worker, because inside the command it overlaps with
the backbone. Peak RSS is ``ru_maxrss`` of the scoring worker.

Cases: the bundled sample (`samples/routine_fall.mp4`, 9 s, 256x256) and a generated 3-minute 640x360 25 fps
video (``moving_scene``, cached in ``bench/out/videos/``), about the length of a Fis-V
programme. The heads are untrained I3D-contract heads (speed does not depend on their
values): GDLT for the first call, the interpretable head for the second.

The machine is shared and noisy, so the figures to quote are ratios: the share of the
first call's wall time that is not the I3D forward, and the re-score / first-score ratio.

Run::

    OMP_NUM_THREADS=1 python bench/bench_score.py            # sample + 3 minutes (~5 min at 1 thread)
    python bench/bench_score.py --quick                      # sample + 20 s, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import FPS, HEIGHT, OUT_DIR, WIDTH, cpu_model, video_for

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "routine_fall.mp4"  # the README's first command scores it


# ------------------------------------------------------------------------------------------------- worker side


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker_score(video: Path, heads: list[Path]) -> dict:
    """Both calls of one case, with the hooks described above."""
    import contextlib
    import io

    import torch

    import aqa_cli.cache
    import aqa_cli.scoring as scoring
    from aqa_cli.cli import app

    timing = {"backbone_build_s": 0.0, "backbone_forward_s": 0.0, "head_s": 0.0, "forward_calls": 0}
    real_create, real_run_head = scoring.create_backbone, scoring.run_head

    def timed_create(*args, **kwargs):
        t = time.perf_counter()
        bb = real_create(*args, **kwargs)
        timing["backbone_build_s"] += time.perf_counter() - t
        started: list[float] = []
        bb.model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

        def done(*_):
            timing["backbone_forward_s"] += time.perf_counter() - started.pop()
            timing["forward_calls"] += 1

        bb.model.register_forward_hook(done)
        return bb

    def timed_run_head(*args, **kwargs):
        t = time.perf_counter()
        out = real_run_head(*args, **kwargs)
        timing["head_s"] += time.perf_counter() - t
        return out

    scoring.create_backbone, scoring.run_head = timed_create, timed_run_head
    cache_dir = Path(tempfile.mkdtemp(prefix="aqa-bench-cache-"))
    aqa_cli.cache.default_cache_dir = lambda: cache_dir  # an empty cache of its own: the first call misses

    def call(head: Path) -> tuple[float, dict]:
        buf = io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            app(["score", str(video), "--weights", str(head), "--json", "--device", "cpu"], standalone_mode=False)
        return time.perf_counter() - t, json.loads(buf.getvalue())

    first_s, first = call(heads[0])
    first_timing = dict(timing)
    rss_first = _peak_rss_mib()
    second_s, second = call(heads[1])
    assert first["features_source"] == "backbone" and second["features_source"] == "cache", (first, second)
    return {
        "video": str(video), "clips": len(first["clips"]), "first_s": first_s, "rescore_s": second_s,
        **first_timing, "rescore_head_s": timing["head_s"] - first_timing["head_s"],
        "rescore_forward_calls": timing["forward_calls"] - first_timing["forward_calls"],
        "peak_rss_mib": rss_first, "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
    }


def worker_decode(video: Path) -> dict:
    """Decoding and clip assembly alone (the I3D geometry), for the clips `aqa score` uses."""
    from aqa_cli.extract import iter_clip_batches, plan_for
    from aqa_cli.recipes import I3D_RECIPE
    from aqa_cli.video import open_video

    t = time.perf_counter()
    with open_video(video) as reader:
        plan = plan_for(reader, I3D_RECIPE)
        clips = sum(len(batch) for batch, _ in iter_clip_batches(reader, plan, I3D_RECIPE, 4))
    return {"decode_s": time.perf_counter() - t, "decode_clips": clips}


# ------------------------------------------------------------------------------------------------- parent side



def heads() -> list[Path]:
    """Untrained GDLT and interpretable heads with the I3D feature contract."""
    import torch

    from aqa_cli.heads import create_head
    from aqa_cli.heads.checkpoint import save_head
    from aqa_cli.presets import load_preset

    paths = []
    preset = load_preset("fisv-pcs")
    for seed, name in enumerate(("gdlt", "interp")):
        path = OUT_DIR / "heads" / f"bench-{name}.safetensors"
        if not path.is_file():
            torch.manual_seed(seed)
            save_head(path, [create_head(name, preset.model_settings(name)).eval()],
                      {"preset": "fisv-pcs", "target": "PCS",
                       "scale": {"score_min": 0.0, "score_max": 40.0, "unit": "points"},
                       "contract": {"backbone": "i3d", "feature_dim": 1024, "recipe": "i3d-deepmind"}})
        paths.append(path)
    return paths


def run_worker(*args: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"worker {' '.join(args)} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(name: str, video: Path, head_paths: list[Path]) -> dict:
    print(f"scoring {name} ...", file=sys.stderr, flush=True)
    result = run_worker("score", str(video), *map(str, head_paths))
    result.update(run_worker("decode", str(video)))
    wall = result["first_s"]
    result["case"] = name
    result["rest_s"] = wall - result["backbone_build_s"] - result["backbone_forward_s"] - result["head_s"]
    result["share_not_forward"] = 1.0 - result["backbone_forward_s"] / wall
    result["share_not_backbone"] = 1.0 - (result["backbone_forward_s"] + result["backbone_build_s"]) / wall
    result["decode_over_forward"] = result["decode_s"] / result["backbone_forward_s"]
    result["head_over_wall"] = result["head_s"] / wall
    result["rescore_over_first"] = result["rescore_s"] / wall
    return result


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="aqa score (I3D + head, CPU)")
    rows = [("clips", "{clips}"), ("first score, wall s", "{first_s:.1f}"),
            ("  backbone build (load + verify) s", "{backbone_build_s:.1f}"),
            ("  I3D forward s", "{backbone_forward_s:.1f}"), ("  head s", "{head_s:.3f}"),
            ("  rest s (probe, hash, decode not overlapped, cache, JSON)", "{rest_s:.1f}"),
            ("decode alone s (separate run)", "{decode_s:.1f}"), ("peak RSS MiB", "{peak_rss_mib:.0f}"),
            ("re-score from cache, other head, s", "{rescore_s:.2f}"),
            ("share of wall not in the I3D forward", "{share_not_forward:.3f}"),
            ("share not in the backbone (forward + build)", "{share_not_backbone:.3f}"),
            ("decode alone / I3D forward", "{decode_over_forward:.3f}"),
            ("head / wall", "{head_over_wall:.4f}"), ("re-score / first score", "{rescore_over_first:.4f}")]
    table.add_column("figure")
    for r in results:
        table.add_column(r["case"], justify="right")
    for label, fmt in rows:
        table.add_row(label, *[fmt.format(**r) for r in results])
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs="+", help="internal: score VIDEO HEAD HEAD | decode VIDEO")
    p.add_argument("--seconds", type=float, default=None, help="length of the long video (default 180; 20 --quick)")
    p.add_argument("--quick", action="store_true", help="a 20 s long video, to smoke-test the script")
    args = p.parse_args(argv)
    if args.worker:
        mode, video, *rest = args.worker
        out = worker_score(Path(video), [Path(h) for h in rest]) if mode == "score" else worker_decode(Path(video))
        print(json.dumps(out))
        return 0
    seconds = args.seconds or (20.0 if args.quick else 180.0)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    head_paths = heads()
    long_video = video_for(seconds)
    results = [measure(f"sample ({SAMPLE.name})", SAMPLE, head_paths), measure(f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s", long_video, head_paths)]
    print_table(results)
    report = {
        "benchmark": "score",
        "settings": {"long_seconds": seconds, "video": f"{WIDTH}x{HEIGHT} {FPS:g} fps synthetic", "device": "cpu",
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch_version": results[0]["torch_version"],
                    "torch_threads": results[0]["torch_threads"], "load_average": os.getloadavg()},
        "runs": results,
    }
    out = OUT_DIR / "score.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
