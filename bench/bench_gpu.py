"""The GPU figures, in one run: model-only throughput, decode against end to end, and `aqa score`.

What is measured
----------------
* **model only**: clips per second of each backbone (VST, I3D) in fp32 and bf16 at batch 1, 8
  and 32, on clips already on the device (a warm-up forward first, then repeated forwards for
  about a second, synchronised).
* **decode alone vs end to end** on a generated ``--seconds`` long 1280x720 25 fps video: the
  decode side alone (``ClipStream``: decode, the recipe's geometry, clip assembly, no model) and
  ``video_features`` with the backbone at bf16 and its automatic batch size, in clips per second;
  end to end should stay within 1.5x of decode alone.
* **aqa score**: the real command (``--preset demo``, I3D, ``--precision auto``) on the same video,
  in a subprocess, wall time. It needs the I3D weights in ``$AQA_HOME`` (the device machine
  cannot download): without them the row says so.

VST runs random Swin-B weights, I3D the real ones when ``$AQA_HOME`` has them, random otherwise
(speed does not depend on the values). ``--dry-run`` shrinks everything (small Swin, short small
video, batches 1 and 2) so that the script can be checked on a CPU in seconds.

Run::

    bench/gpu_check.sh                                   # on the GPU machine: tests, then this
    python bench/bench_gpu.py --device cuda --seconds 180 --out DIR
    python bench/bench_gpu.py --device cpu --dry-run     # the script itself, on any machine

Writes ``gpu.json`` and ``gpu.md`` (the table) to ``--out`` (default ``bench/out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_models(device, dry_run: bool) -> dict:
    """{backbone: (Backbone-like spec name, torch module fp32, input size (T, H, W), weights note)}."""
    import torch

    from aqa_cli.backbones.i3d import InceptionI3d, fuse_batchnorm
    from aqa_cli.backbones.vst import SWIN_B, SwinConfig, VideoSwin, build_swin3d, use_fused_attention
    from aqa_cli.errors import AqaError

    torch.manual_seed(0)
    cfg = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)) if dry_run else SWIN_B
    vst = VideoSwin(use_fused_attention(build_swin3d(cfg))).eval().requires_grad_(False)
    i3d, note = None, "random"
    if not dry_run:
        try:
            from aqa_cli.backbones import create_backbone

            i3d, note = create_backbone("i3d", device="cpu", precision="fp32", fetch=False).model, "real"
        except AqaError:
            pass
    if i3d is None:
        i3d = fuse_batchnorm(InceptionI3d()).eval().requires_grad_(False)
    size = (8, 64, 64) if dry_run else (32, 224, 224)
    return {"vst": (vst.to(device), size, "random"), "i3d": (i3d.to(device), size, note)}


def model_only(models: dict, device, precisions: list[str], batches: list[int], seconds: float,
               min_runs: int = 3) -> list[dict]:
    import copy

    import torch

    rows = []
    for name, (model, (t, h, w), note) in models.items():
        for precision in precisions:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            m = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model
            for batch in batches:
                x = torch.randn(batch, 3, t, h, w, device=device, dtype=dtype)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with torch.inference_mode():
                    m(x)
                    _sync(device)
                    n, start = 0, time.perf_counter()
                    while n < min_runs or time.perf_counter() - start < seconds:
                        m(x)
                        n += 1
                    _sync(device)
                wall = (time.perf_counter() - start) / n
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                rows.append({"backbone": name, "weights": note, "precision": precision, "batch": batch,
                             "clips_per_s": batch / wall, "peak_gib": peak})
                print(f"model only {name} {precision} batch {batch}: {batch / wall:.1f} clips/s", file=sys.stderr,
                      flush=True)
            del m
    return rows


def make_video(seconds: float, width: int, height: int, out_dir: Path) -> Path:
    from aqa_cli.synthetic import moving_scene, write_video

    path = out_dir / "videos" / f"scene_{seconds:g}s_{width}x{height}.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.mp4")
        write_video(tmp, moving_scene(int(round(seconds * 25)), height, width), 25.0)
        os.replace(tmp, path)
    return path


def decode_vs_end_to_end(models: dict, device, video: Path, precision: str) -> list[dict]:
    from aqa_cli.backbones import Backbone, get_backbone_spec
    from aqa_cli.extract import ClipStream, video_features

    import torch

    rows = []
    for name, (model, _size, note) in models.items():
        spec = get_backbone_spec(name)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        bb = Backbone(spec, model.to(dtype), weights_sha256="", class_names=None, device=device, precision=precision)
        batch = bb.auto_batch_size()
        t = time.perf_counter()
        stream = ClipStream(video, spec.recipe, batch)
        try:
            clips = sum(len(c) for c, _ in stream)
        finally:
            stream.close()
        decode_s = time.perf_counter() - t
        t = time.perf_counter()
        result = video_features(video, bb, batch_size=batch)
        _sync(device)
        e2e_s = time.perf_counter() - t
        rows.append({"backbone": name, "precision": precision, "batch": batch, "clips": clips,
                     "decode_clips_per_s": clips / decode_s, "end_to_end_clips_per_s": len(result.features) / e2e_s,
                     "end_to_end_over_decode_time": e2e_s / decode_s})
        model.float()
        print(f"{name}: decode {clips / decode_s:.1f} clips/s, end to end {len(result.features) / e2e_s:.1f} "
              f"clips/s (batch {batch})", file=sys.stderr, flush=True)
    return rows


def aqa_score(video: Path, device: str) -> dict:
    from aqa_cli.weights import is_cached

    if not is_cached("i3d-kinetics400"):
        return {"skipped": "no I3D weights in $AQA_HOME (copy i3d-kinetics400.* into $AQA_HOME/weights)"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "aqa_cli", "score", str(video), "--preset", "demo", "--device",
                           device, "--precision", "auto", "--no-cache", "--json"], cwd=REPO, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"failed": proc.stderr.strip()[-300:], "wall_s": wall}
    score = json.loads(proc.stdout)
    return {"wall_s": wall, "score": score["score"], "clips": len(score["clips"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, default=180.0, help="length of the generated 1280x720 video")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    p.add_argument("--dry-run", action="store_true", help="tiny models, a 3 s 320x176 video: checks the script runs")
    args = p.parse_args()
    import torch

    from aqa_cli.backbones import native_bf16, resolve_device

    device = resolve_device(args.device)
    if args.dry_run and device.type == "cpu":
        # One thread: on a shared CPU a team of two waits at every small operation for its preempted partner.
        torch.set_num_threads(1)
    if args.dry_run:
        args.seconds, args.batches, size, timed = 3.0, [1, 2], (320, 176), 0.0
    else:
        size, timed = (1280, 720), 1.0
    native = native_bf16(device)
    precisions = ["fp32", "bf16"] if native else ["fp32"]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    models = build_models(device, args.dry_run)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "native_bf16": native, "dry_run": args.dry_run,
              "model_only": model_only(models, device, precisions, args.batches, timed, 1 if args.dry_run else 3)}
    video = make_video(args.seconds, *size, REPO / "bench" / "out")  # not in --out: only the figures go back
    report["video"] = f"{args.seconds:g} s {size[0]}x{size[1]} 25 fps synthetic"
    report["decode_vs_end_to_end"] = decode_vs_end_to_end(models, device, video, precisions[-1])
    report["aqa_score"] = aqa_score(video, str(device))
    report["wall_s"] = time.perf_counter() - started

    lines = [f"{report['device']}, torch {report['torch']}, native bf16 {native}"
             f"{' (dry run: tiny models, not figures)' if args.dry_run else ''}", "",
             "| backbone | weights | precision | batch | clips/s (model only) | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["model_only"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "–"
        lines.append(f"| {r['backbone']} | {r['weights']} | {r['precision']} | {r['batch']} | {r['clips_per_s']:.1f} | {peak} |")
    lines += ["", f"{report['video']}:", "",
              "| backbone | precision | batch (auto) | decode alone, clips/s | end to end, clips/s | end to end / decode time |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in report["decode_vs_end_to_end"]:
        lines.append(f"| {r['backbone']} | {r['precision']} | {r['batch']} | {r['decode_clips_per_s']:.1f} | "
                     f"{r['end_to_end_clips_per_s']:.1f} | {r['end_to_end_over_decode_time']:.2f} |")
    s = report["aqa_score"]
    lines += ["", "`aqa score VIDEO --preset demo --precision auto --no-cache`: "
              + (f"{s['wall_s']:.1f} s wall, {s['clips']} clips, score {s['score']:.3f}" if "score" in s
                 else s.get("skipped") or f"failed: {s.get('failed')}")]
    table = "\n".join(lines) + "\n"
    (args.out / "gpu.md").write_text(table)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    return 0 if "failed" not in report["aqa_score"] else 1


if __name__ == "__main__":
    sys.exit(main())
