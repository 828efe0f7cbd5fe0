"""bf16 against fp32: how far the features drift, and whether ``--precision auto`` may pick bf16.

What is measured
----------------
* **I3D, real weights** (DeepMind's Kinetics-400, fetched through the package index), on the
  shared Kinetics clips (``../shared/videos``) and the bundled ``samples/routine_fall.mp4``:
  per-clip cosine between bf16 and fp32 features (min and mean), per-clip and per-video top-1
  agreement of the Kinetics logits, and the demo head's score (``weights/demo-interp.safetensors``)
  on ``routine_fall.mp4`` from each, with their difference.
* **Video Swin-B, random weights** (seed 0; the Kinetics-600 release cannot be downloaded
  everywhere): per-clip cosine on clips of ``arm_wrestling.mp4``.
* The bound ``--precision auto`` is held to: per-clip cosine >= 0.999 and the demo score within
  0.05. The script exits 1 when a backbone breaks it. ``auto`` is ``aqa score``'s default
  (docs/performance.md), so this bound is what a user gets without asking; the last line says what
  ``auto`` picks on this machine.

Where the device computes bf16 natively (a GPU, or a CPU with AVX-512 BF16 or AMX) the real bf16
path runs: weights and activations in bf16. Elsewhere a real bf16 forward runs through torch's
fallbacks at about 1 GFLOP/s, too slow to measure with, so
* I3D runs :func:`aqa_cli.backbones.i3d.emulate_bf16`: float32 arithmetic on values rounded to
  bf16 wherever the native path stores bf16 (the same numbers up to accumulation order);
* VST runs the real bf16 path on smaller clips (8 frames of 112x112 instead of 32 of 224x224:
  every block still runs, on a 16th of the tokens).
The table says which was used.

Run::

    python bench/bench_precision.py                 # ~5 min on a 2-core CPU
    python bench/bench_precision.py --device cuda   # the real bf16 path at full size

Writes ``bench/out/precision.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _common import OUT_DIR, cpu_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COSINE_BOUND = 0.999
SCORE_BOUND = 0.05


def per_clip_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def i3d_drift(device: str) -> dict:

    from aqa_cli.backbones import Backbone, create_backbone, native_bf16
    from aqa_cli.backbones.i3d import emulate_bf16
    from aqa_cli.extract import video_features
    from aqa_cli.scoring import Scorer, choose_heads

    fp32 = create_backbone("i3d", device=device, precision="fp32")
    native = native_bf16(fp32.device)
    if native:
        bf16 = create_backbone("i3d", device=device, precision="bf16")
        how = "native bf16"
    else:
        bf16 = Backbone(fp32.spec, emulate_bf16(fp32.model), weights_sha256=fp32.weights_sha256,
                        class_names=fp32.class_names, device=fp32.device, precision="fp32")
        how = "emulated bf16 (float32 on bf16-rounded values)"
    videos = sorted(p for p in (SHARED / "videos").glob("*") if p.suffix in (".mp4", ".mkv"))
    videos.append(REPO / "samples" / "routine_fall.mp4")
    rows, cosines, clip_agree, clips = [], [], 0, 0
    for video in videos:
        a, b = video_features(video, fp32), video_features(video, bf16)
        cos = per_clip_cosine(a.features, b.features)
        top_a, top_b = a.logits.argmax(1), b.logits.argmax(1)
        cosines.append(cos)
        clip_agree += int((top_a == top_b).sum())
        clips += len(cos)
        rows.append({"video": video.name, "clips": len(cos), "cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
                     "top1_clip_agreement": float((top_a == top_b).mean()),
                     "top1_video_same": bool(a.logits.mean(0).argmax() == b.logits.mean(0).argmax()),
                     "max_abs_diff": float(np.abs(a.features - b.features).max())})
    head = choose_heads(weights=REPO / "weights" / "demo-interp.safetensors")
    scores = {}
    for name, bb in (("fp32", fp32), ("bf16", bf16)):
        [result] = Scorer(head, cache=None, device=device, backbone_factory=lambda _n, bb=bb: bb).score(
            REPO / "samples" / "routine_fall.mp4")
        scores[name] = result.score
    all_cos = np.concatenate(cosines)
    return {"backbone": "i3d", "weights": "real (DeepMind Kinetics-400)", "bf16": how, "videos": rows,
            "clips": clips, "cos_min": float(all_cos.min()), "cos_mean": float(all_cos.mean()),
            "top1_clip_agreement": clip_agree / clips,
            "demo_score_fp32": scores["fp32"], "demo_score_bf16": scores["bf16"],
            "demo_score_diff": abs(scores["bf16"] - scores["fp32"]),
            "within_bounds": bool(all_cos.min() >= COSINE_BOUND and abs(scores["bf16"] - scores["fp32"]) <= SCORE_BOUND)}


def vst_drift(device: str, clips_wanted: int) -> dict:
    import torch

    from aqa_cli.backbones import native_bf16, resolve_device
    from aqa_cli.backbones.vst import SWIN_B, VideoSwin, build_swin3d, use_fused_attention
    from aqa_cli.extract import iter_clip_batches, plan_for
    from aqa_cli.recipes import GDLT_RECIPE
    from aqa_cli.video import open_video

    dev = resolve_device(device)
    native = native_bf16(dev)
    recipe = GDLT_RECIPE if native else GDLT_RECIPE.replace(clip_len=8, stride=8, final_size=(112, 112))
    torch.manual_seed(0)
    model = VideoSwin(use_fused_attention(build_swin3d(SWIN_B))).eval().to(dev)
    with open_video(SHARED / "videos" / "arm_wrestling.mp4") as reader:
        plan = plan_for(reader, recipe)
        batches = [b for _, b in iter_clip_batches(reader, plan, recipe, 1)]
    step = max(1, len(batches) // clips_wanted)
    clips = np.concatenate(batches[::step][:clips_wanted])
    x = recipe.normalize(torch.from_numpy(clips).to(dev))
    with torch.inference_mode():
        t = time.perf_counter()
        a = model(x).features.float().cpu().numpy()
        t_fp32 = time.perf_counter() - t
        model.to(torch.bfloat16)
        t = time.perf_counter()
        b = model(x.to(torch.bfloat16)).features.float().cpu().numpy()
        t_bf16 = time.perf_counter() - t
    cos = per_clip_cosine(a, b)
    return {"backbone": "vst", "weights": "random Swin-B (seed 0)",
            "bf16": "native bf16" if native else "real bf16 through torch's fallbacks, on smaller clips",
            "input": f"{recipe.clip_len}x{recipe.final_size[0]}x{recipe.final_size[1]}", "clips": len(cos),
            "cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "max_abs_diff": float(np.abs(a - b).max()),
            "fp32_s": t_fp32, "bf16_s": t_bf16, "within_bounds": bool(cos.min() >= COSINE_BOUND)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vst-clips", type=int, default=4)
    parser.add_argument("--skip-i3d", action="store_true")
    args = parser.parse_args()
    if not (SHARED / "videos").is_dir():
        print(f"{SHARED / 'videos'} is absent: the shared Kinetics clips are needed", file=sys.stderr)
        return 2
    import torch

    from aqa_cli.backbones import cpu_has_native_bf16

    started = time.perf_counter()
    results = [] if args.skip_i3d else [i3d_drift(args.device)]
    results.append(vst_drift(args.device, args.vst_clips))
    machine = {"cpu": cpu_model(), "cpu_native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "load_average": os.getloadavg(), "torch": torch.__version__, "wall_s": time.perf_counter() - started}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "precision.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"{machine['cpu']}, {machine['threads']} threads, native bf16 on the CPU: {machine['cpu_native_bf16']}, "
          f"load average {', '.join(f'{x:.1f}' for x in machine['load_average'])}")
    print("| backbone | weights | bf16 | clips | cosine min | cosine mean | top-1 agreement (clips) | demo score fp32 → bf16 | within bounds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        top1 = f"{r['top1_clip_agreement']:.3f}" if "top1_clip_agreement" in r else "–"
        demo = (f"{r['demo_score_fp32']:.4f} → {r['demo_score_bf16']:.4f} (Δ {r['demo_score_diff']:.4f})"
                if "demo_score_diff" in r else "–")
        print(f"| {r['backbone']} | {r['weights']} | {r['bf16']}{', ' + r['input'] if 'input' in r else ''} | "
              f"{r['clips']} | {r['cos_min']:.6f} | {r['cos_mean']:.6f} | {top1} | {demo} | {r['within_bounds']} |")
    from aqa_cli.backbones import get_backbone_spec, resolve_device, resolve_precision

    dev = resolve_device(args.device)
    picks = {name: resolve_precision("auto", dev, get_backbone_spec(name)) for name in ("i3d", "vst")}
    print(f"`--precision auto` (the default of `aqa score`) here, on {dev}: "
          + ", ".join(f"{name} → {pick}" for name, pick in picks.items()))
    return 0 if all(r["within_bounds"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
