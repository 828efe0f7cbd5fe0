"""Benchmark the ``vst`` backbone (Video Swin-B, GDLT recipe): speed per clip, bf16 drift, decode throughput.

What is measured
----------------
* **decode**: ``iter_clip_batches`` alone (decode, GDLT geometry, clip assembly,
  no model): frames and clips per second.
* **ours fp32 / ours bf16**: ``aqa_cli.extract.video_features`` with the
  ``vst`` backbone (prefetch thread, batched clips), seconds per clip. bf16 is
  autocast (on the CPU where the CPU supports it).
* **bf16 drift**: cosine similarity between the bf16 and fp32 feature of each
  clip (min and mean), and the largest absolute difference.
* **naive**: the reference loop of ``bench_extract.py`` (whole video decoded
  into memory first, then one clip per fp32 forward); the ratio ours/naive.
* **channels_last_3d**: the patch embedding (the network's only convolution,
  so the only layer the memory format can change) timed both ways, with its
  share of a whole forward.
* Each mode runs ``--repeats`` times, the modes taking turns, and its fastest
  round is reported (the machine this was written on is shared, so the
  others are inflated by whatever else runs; the load average is recorded).
* **GPU only** (``--device cuda``): model throughput at batch 1, 8 and 32 in
  fp32 and bf16, on clips already on the GPU.

The real Kinetics-600 weights cannot be downloaded everywhere, and speed does not
depend on the values, so a randomly initialised Swin-B (seed 0) is imported as
``vst-k600`` into a private cache, ``bench/out/aqa-home``, never the user's.
Random weights make the bf16 drift figure indicative only: real weights can
drift more.

Run::

    python bench/bench_vst.py            # 4 clips (5.12 s video), 2 rounds, ~5 min on a 2-core CPU
    python bench/bench_vst.py --quick    # 2 clips, ~2 min
    python bench/bench_vst.py --device cuda --seconds 41

Writes every figure and machine information to ``bench/out/vst.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from _common import FPS, HEIGHT, OUT_DIR, WIDTH, cpu_model, video_for



def _prepare_home() -> None:
    """Point AQA_HOME at the benchmark's cache and put random Swin-B weights in it once."""
    os.environ["AQA_HOME"] = str(OUT_DIR / "aqa-home")
    os.environ.pop("AQA_OFFLINE", None)
    from aqa_cli.weights import import_file, is_cached

    if is_cached("vst-k600"):
        return
    import torch

    from aqa_cli.backbones.vst import SWIN_B, build_swin3d

    torch.manual_seed(0)
    path = OUT_DIR / "random_swin3d_b_k600.pth"
    torch.save(build_swin3d(SWIN_B).state_dict(), path)
    try:
        import_file("vst-k600", path, fmt="torchvision")
    finally:
        path.unlink(missing_ok=True)



def measure_decode(video: Path, recipe, batch_size: int) -> dict:
    from aqa_cli.extract import iter_clip_batches, plan_for
    from aqa_cli.video import open_video

    t = time.perf_counter()
    with open_video(video) as reader:
        plan = plan_for(reader, recipe)
        clips = sum(len(c) for c, _ in iter_clip_batches(reader, plan, recipe, batch_size))
        frames = len(plan.needed_source_frames())
    wall = time.perf_counter() - t
    return {"clips": clips, "frames": frames, "wall_s": wall, "frames_per_s": frames / wall,
            "clips_per_s": clips / wall}


def measure_ours(video: Path, backbone, batch_size: int) -> tuple[dict, "np.ndarray"]:  # noqa: F821
    from aqa_cli.extract import video_features

    t = time.perf_counter()
    result = video_features(video, backbone, batch_size=batch_size)
    wall = time.perf_counter() - t
    n = len(result.features)
    return {"clips": n, "wall_s": wall, "s_per_clip": wall / n, "clips_per_s": n / wall}, result.features


def measure_naive(video: Path, backbone) -> tuple[dict, "np.ndarray"]:  # noqa: F821
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_extract import _run_naive  # the same reference loop as the I3D benchmark

    t = time.perf_counter()
    feats, extra = _run_naive(video, backbone)
    wall = time.perf_counter() - t
    n = len(feats)
    return {"clips": n, "wall_s": wall, "s_per_clip": wall / n, "clips_per_s": n / wall, **extra}, feats


def measure_channels_last(backbone, forward_s: float, repeats: int = 5) -> dict:
    import torch

    pe = backbone.model.net.patch_embed
    h, w = backbone.recipe.input_size
    x = torch.randn(1, 3, backbone.recipe.clip_len, h, w, device=backbone.device)
    out = {}
    with torch.inference_mode():
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
            pe.to(memory_format=fmt)
            t = time.perf_counter()
            for _ in range(repeats):
                # The conversion is counted: in use the input arrives contiguous.
                pe(x.contiguous(memory_format=fmt))
            _sync(backbone.device)
            out[f"patch_embed_{name}_s"] = (time.perf_counter() - t) / repeats
        pe.to(memory_format=torch.contiguous_format)
    out["patch_embed_share_of_forward"] = out["patch_embed_contiguous_s"] / forward_s
    saved = out["patch_embed_contiguous_s"] - out["patch_embed_channels_last_3d_s"]
    out["saving_share_of_forward"] = saved / forward_s
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_gpu_batches(device: str, batches: list[int], repeats: int = 3) -> list[dict]:
    import numpy as np
    import torch

    from aqa_cli.backbones import create_backbone

    rows = []
    for precision in ("fp32", "bf16"):
        bb = create_backbone("vst", device=device, precision=precision)
        h, w = bb.recipe.input_size
        for b in batches:
            clips = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (b, 32, h, w, 3), dtype=np.uint8))
            clips = clips.to(bb.device)
            bb(clips)  # warm-up
            _sync(bb.device)
            t = time.perf_counter()
            for _ in range(repeats):
                bb(clips)
            _sync(bb.device)
            wall = (time.perf_counter() - t) / repeats
            rows.append({"precision": precision, "batch": b, "clips_per_s": b / wall,
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30})
            torch.cuda.reset_peak_memory_stats()
    return rows


def machine_info() -> dict:
    import torch

    return {"cpu_model": cpu_model(), "cpus_usable": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=2, help="clips per forward in our pipeline (default 2)")
    p.add_argument("--seconds", type=float, help="video length (default 5.12 s = 4 clips; 2.56 s with --quick)")
    p.add_argument("--repeats", type=int, help="rounds over all modes, the fastest kept (default 2; 1 with --quick)")
    p.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 8, 32], help="GPU batch sizes (default 1 8 32)")
    p.add_argument("--quick", action="store_true", help="2 clips, to smoke-test the script")
    args = p.parse_args(argv)
    seconds = args.seconds or (2.56 if args.quick else 5.12)
    repeats = args.repeats or (1 if args.quick else 2)
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    _prepare_home()
    import numpy as np
    import torch

    from aqa_cli.backbones import create_backbone

    video = video_for(seconds)
    fp32 = create_backbone("vst", device=args.device, precision="fp32")
    bf16 = create_backbone("vst", device=args.device, precision="bf16")
    print(f"vst on {fp32.device}, {torch.get_num_threads()} threads, {seconds:g} s video, batch {args.batch_size}",
          file=sys.stderr)
    # One short untimed forward each: the first call pays for allocator growth and kernel selection.
    h, w = fp32.recipe.input_size
    for bb in (fp32, bf16):
        bb(np.zeros((1, 8, h, w, 3), dtype=np.uint8))

    report: dict = {"benchmark": "vst", "settings": {"seconds": seconds, "batch_size": args.batch_size,
                                                     "repeats": repeats, "device": str(fp32.device),
                                                     "quick": args.quick,
                                                     "video": f"{WIDTH}x{HEIGHT} {FPS:g} fps synthetic",
                                                     "weights": "random Swin-B (seed 0), 600 classes"},
                    "machine": machine_info(), "load_average_before": os.getloadavg()}
    # The modes take turns, and each keeps its fastest round: on a shared machine the other load comes and
    # goes, and the minimum is the figure least disturbed by it.
    runs: dict[str, list[dict]] = {"decode": [], "ours_fp32": [], "ours_bf16": [], "naive_fp32": []}
    for round_no in range(repeats):
        print(f"round {round_no + 1}/{repeats}: decode, ours fp32, ours bf16, naive fp32 ...", file=sys.stderr,
              flush=True)
        runs["decode"].append(measure_decode(video, fp32.recipe, args.batch_size))
        m, f32 = measure_ours(video, fp32, args.batch_size)
        runs["ours_fp32"].append(m)
        m, b16 = measure_ours(video, bf16, args.batch_size)
        runs["ours_bf16"].append(m)
        m, naive = measure_naive(video, fp32)
        runs["naive_fp32"].append(m)
    for key, rounds in runs.items():
        report[key] = min(rounds, key=lambda r: r["wall_s"])
        report[key]["rounds_wall_s"] = [r["wall_s"] for r in rounds]
    report["load_average_after"] = os.getloadavg()
    cos = (f32 * b16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(b16, axis=1)
    report["bf16_drift"] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                            "max_abs_diff": float(np.abs(f32 - b16).max()),
                            "feature_abs_mean": float(np.abs(f32).mean())}
    report["ours_vs_naive_fp32_max_abs_diff"] = float(np.abs(f32 - naive).max())
    report["ratios"] = {"ours_fp32_over_naive_clips_per_s": report["ours_fp32"]["clips_per_s"]
                        / report["naive_fp32"]["clips_per_s"],
                        "ours_bf16_over_naive_clips_per_s": report["ours_bf16"]["clips_per_s"]
                        / report["naive_fp32"]["clips_per_s"],
                        "bf16_over_fp32_clips_per_s": report["ours_bf16"]["clips_per_s"]
                        / report["ours_fp32"]["clips_per_s"]}
    report["channels_last_3d"] = measure_channels_last(fp32, report["ours_fp32"]["s_per_clip"])
    if fp32.device.type == "cuda":
        report["gpu_batches"] = measure_gpu_batches(args.device, args.gpu_batches)

    d, r = report["decode"], report["ratios"]
    print(f"load average before {report['load_average_before'][0]:.2f}, after {report['load_average_after'][0]:.2f} "
          f"on {report['machine']['cpus_usable']} CPUs")
    print(f"decode (GDLT geometry, no model): {d['frames_per_s']:.0f} frames/s, {d['clips_per_s']:.1f} clips/s")
    for key in ("ours_fp32", "ours_bf16", "naive_fp32"):
        m = report[key]
        rounds = ", ".join(f"{w:.1f}" for w in m["rounds_wall_s"])
        print(f"{key:11s} {m['s_per_clip']:7.2f} s/clip  ({m['clips']} clips; rounds took {rounds} s)")
    print(f"ours/naive clips/s: fp32 {r['ours_fp32_over_naive_clips_per_s']:.2f}, "
          f"bf16 {r['ours_bf16_over_naive_clips_per_s']:.2f}; bf16/fp32 {r['bf16_over_fp32_clips_per_s']:.2f}")
    b = report["bf16_drift"]
    print(f"bf16 vs fp32 features: cosine min {b['cosine_min']:.6f}, mean {b['cosine_mean']:.6f}, "
          f"max |diff| {b['max_abs_diff']:.3g} (mean |feature| {b['feature_abs_mean']:.3g})")
    print(f"ours vs naive fp32 max |diff|: {report['ours_vs_naive_fp32_max_abs_diff']:.2e}")
    c = report["channels_last_3d"]
    print(f"patch embedding: {c['patch_embed_contiguous_s'] * 1e3:.1f} ms contiguous, "
          f"{c['patch_embed_channels_last_3d_s'] * 1e3:.1f} ms channels_last_3d "
          f"({c['saving_share_of_forward']:.2%} of a forward saved)")
    for row in report.get("gpu_batches", []):
        print(f"GPU {row['precision']} batch {row['batch']:3d}: {row['clips_per_s']:.1f} clips/s, "
              f"peak {row['peak_mem_gib']:.1f} GiB")
    out = OUT_DIR / "vst.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
