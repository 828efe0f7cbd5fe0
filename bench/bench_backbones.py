"""Backbone speed, one run: every mode of VST and I3D against its eager fp32 reference, on the same machine load.

What is measured, per backbone and mode
---------------------------------------
* **s/clip**, model only: one 32-frame clip (VST 224x224, I3D 224x224) per forward at ``--batch``,
  the modes taking turns for ``--rounds`` rounds, each keeping its fastest (the machine is shared).
* **ratio** to the reference measured in the same run: eager torchvision ``swin3d_b`` in fp32
  for ``vst`` (torchvision's own window attention), our plain fp32 path for ``i3d``.
* **GFLOP/s** achieved: the work of one clip counted once (``FlopCounterMode`` on the eager VST;
  the counted convolutions for I3D) over the mode's time; and its **share of the GEMM peak**, from
  a GEMM micro-benchmark (8192x1024 @ 1024x1024) run in the same process, in fp32 and bf16.
* **marginal s/clip of the real command**: ``aqa extract-features`` in a subprocess on a 5-clip
  and a 1-clip video, (t5 - t1) / 4, which leaves out start-up and weight loading.

bf16 modes run only where the device computes bf16 natively (``aqa_cli.backbones.native_bf16``);
elsewhere torch's fallbacks run at about 1 GFLOP/s and the mode is reported as skipped. VST uses
random Swin-B weights (speed does not depend on their values), imported as ``vst-k600`` into the
benchmark's own ``bench/out/aqa-home``; I3D uses the real weights from ``$AQA_HOME``.

Run::

    python bench/bench_backbones.py                      # 2 threads, ~10 min on a loaded 2-core CPU
    python bench/bench_backbones.py --backbones i3d --rounds 3
    python bench/bench_backbones.py --backbones i3d --rounds 3 --no-extract --threads 1 --clock cpu   # shared machine
    python bench/bench_backbones.py --device cpu --dry-run   # seconds: tiny inputs, smoke test only

Writes ``bench/out/backbones.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import OUT_DIR, cpu_model

REPO = Path(__file__).resolve().parents[1]
VST_HOME = OUT_DIR / "aqa-home"


def gemm_peak(dtype, device, seconds: float = 1.0) -> float:
    """GFLOP/s of an 8192x1024 @ 1024x1024 matrix product (rows cut down when the dtype is slow here)."""
    import torch

    b = torch.randn(1024, 1024, dtype=dtype, device=device)
    rows = 256
    while True:
        a = torch.randn(rows, 1024, dtype=dtype, device=device)
        a @ b
        _sync(device)
        t = CLOCK()
        n = 0
        while CLOCK() - t < seconds / 4 or n < 2:
            a @ b
            n += 1
        _sync(device)
        took = (CLOCK() - t) / n
        if rows >= 8192 or took > seconds / 4:
            return 2 * rows * 1024 * 1024 / took / 1e9
        rows *= 2


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def vst_models(device, native_bf16: bool, dry_run: bool):
    """(reference eager fp32, {mode: model}) with random Swin-B weights (a small Swin for --dry-run)."""
    import copy

    import torch

    from aqa_cli.backbones.vst import SWIN_B, SwinConfig, VideoSwin, build_swin3d, use_fused_attention

    cfg = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)) if dry_run else SWIN_B
    torch.manual_seed(0)
    eager = VideoSwin(build_swin3d(cfg)).eval().to(device)
    modes = {"fused fp32": (VideoSwin(use_fused_attention(copy.deepcopy(eager.net))).eval(), torch.float32)}
    if native_bf16:
        modes["fused bf16"] = (copy.deepcopy(modes["fused fp32"][0]).to(torch.bfloat16), torch.bfloat16)
    return eager, modes


def i3d_models(device, native_bf16: bool, dry_run: bool):
    import copy

    import torch

    from aqa_cli.backbones.i3d import InceptionI3d, fuse_batchnorm

    if dry_run:
        torch.manual_seed(0)
        plain = fuse_batchnorm(InceptionI3d()).eval().to(device)
    else:
        from aqa_cli.backbones import create_backbone

        plain = create_backbone("i3d", device=str(device), precision="fp32").model
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last_3d)
    modes = {"fp32 channels_last_3d": (cl, torch.float32)}
    if native_bf16:
        # "bf16" is what aqa runs: weights and input channels-last (InceptionI3d.channels_last_bf16); "bf16 NCDHW"
        # the default layout it replaced.
        modes["bf16"] = (copy.deepcopy(plain).to(torch.bfloat16), torch.bfloat16)
        ncdhw = copy.deepcopy(plain)
        ncdhw.channels_last_bf16 = False
        modes["bf16 NCDHW"] = (ncdhw.to(torch.bfloat16), torch.bfloat16)
    return plain, modes


def vst_flops(model, x) -> float:
    """FLOPs of one forward (it doubles as the reference's warm-up)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def i3d_flops(model, x) -> float:
    """2 x multiply-adds of every convolution, counted from the shapes a forward actually sees."""
    import torch

    from aqa_cli.backbones.i3d import Unit3D

    total = [0.0]

    def hook(unit, _inputs, out) -> None:
        w = unit.conv.weight
        total[0] += 2.0 * out.numel() * w.shape[1] * w.shape[2] * w.shape[3] * w.shape[4]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Unit3D)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


# The clock model-only times read: wall time, or with --clock cpu this process's CPU time (one thread), which a
# machine shared with other jobs inflates far less than wall time (a preempted thread's CPU clock stops).
CLOCK = time.perf_counter


def time_forward(model, x, device):
    """(seconds, output features) of one forward."""
    import torch

    with torch.inference_mode():
        t = CLOCK()
        out = model(x)
        _sync(device)
    return CLOCK() - t, out.features.float()


def model_only(name: str, device, native: bool, batch: int, rounds: int, dry_run: bool) -> dict:
    import torch

    if name == "vst":
        ref, modes = vst_models(device, native, dry_run)
        size, ref_name = (8, 64) if dry_run else (32, 224), "eager torchvision fp32"
    else:
        ref, modes = i3d_models(device, native, dry_run)
        size, ref_name = (16, 112) if dry_run else (32, 224), "plain fp32"
    x = torch.randn(batch, 3, size[0], size[1], size[1], device=device)
    flops = (vst_flops if name == "vst" else i3d_flops)(ref, x)  # also the reference's warm-up
    flops /= batch
    all_modes = {ref_name: (ref, torch.float32), **modes}
    inputs = {}
    for mode, (model, dtype) in all_modes.items():
        xi = x.to(dtype)
        if "channels_last_3d" in mode:
            xi = xi.contiguous(memory_format=torch.channels_last_3d)
        inputs[mode] = xi
        if mode != ref_name:
            time_forward(model, xi, device)  # warm-up: allocator growth, kernel choice, the mask caches
    times: dict[str, list[float]] = {m: [] for m in all_modes}
    outputs = {}
    for round_no in range(rounds):
        for mode, (model, _) in all_modes.items():
            took, outputs[mode] = time_forward(model, inputs[mode], device)
            times[mode].append(took / batch)
            print(f"  round {round_no + 1} {name} {mode}: {took / batch:.2f} s/clip (load average "
                  f"{os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    drift = {m: float(torch.nn.functional.cosine_similarity(outputs[m], outputs[ref_name]).min())
             for m in all_modes}
    best = {m: min(t) for m, t in times.items()}
    return {"reference": ref_name, "flops_per_clip": flops, "batch": batch,
            "modes": {m: {"s_per_clip": best[m], "rounds_s": times[m], "ratio_to_reference": best[ref_name] / best[m],
                          "gflop_per_s": flops / best[m] / 1e9, "cosine_min_vs_reference": drift[m]}
                      for m in all_modes},
            "skipped": [] if native else ["bf16 (no native bf16 on this device)"]}


# `aqa score` of VST features needs a head of their contract: the PCS preset's default (its values do not matter).
SCORE_PRESET = {"vst": "fisv-pcs"}


def extract_marginal(name: str, device: str, precision: str, short: Path, long: Path, clips: tuple[int, int],
                     env: dict, rounds: int = 2, command: str = "extract-features") -> dict:
    """Wall time of the real command on both videos, the fastest of ``rounds`` runs each (short and long
    taking turns); (t_long - t_short) / extra clips. A single pair of runs carries the seconds of noise of
    two Python start-ups (imports alone vary by 1-2 s on a shared machine). ``command`` "score" times
    ``aqa score`` instead (no feature cache, the head and its clip effects included)."""
    walls: dict[str, list[float]] = {"short": [], "long": []}
    print(f"  {name} aqa {command} --precision {precision} on {clips[0]} and {clips[1]} clips, "
          f"{rounds} round(s) ...", file=sys.stderr, flush=True)
    for _ in range(rounds):
        for label, video in (("short", short), ("long", long)):
            with tempfile.TemporaryDirectory() as out:
                if command == "score":
                    args = ["score", str(video), "--preset", SCORE_PRESET.get(name, "demo"), "--no-cache", "--json"]
                else:
                    args = ["extract-features", str(video), "--out", out]
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "aqa_cli", *args,
                                       "--backbone", name, "--device", device, "--precision", precision],
                                      cwd=REPO, env=env, capture_output=True, text=True)
                walls[label].append(time.perf_counter() - t)
                if proc.returncode != 0:
                    raise RuntimeError(f"aqa {command} failed: {proc.stderr.strip()[-400:]}")
    best = {k: min(v) for k, v in walls.items()}
    return {"command": command, "precision": precision, "wall_s": best, "rounds_wall_s": walls,
            "marginal_s_per_clip": (best["long"] - best["short"]) / (clips[1] - clips[0])}


def _prepare_vst_home() -> None:
    """Random Swin-B weights imported as vst-k600 into the benchmark's own AQA_HOME (once)."""
    env_home = os.environ.get("AQA_HOME")
    os.environ["AQA_HOME"] = str(VST_HOME)
    try:
        from aqa_cli.weights import import_file, is_cached

        if is_cached("vst-k600"):
            return
        import torch

        from aqa_cli.backbones.vst import SWIN_B, build_swin3d

        torch.manual_seed(0)
        path = OUT_DIR / "random_swin3d_b_k600.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(build_swin3d(SWIN_B).state_dict(), path)
        try:
            import_file("vst-k600", path, fmt="torchvision")
        finally:
            path.unlink(missing_ok=True)
    finally:
        if env_home is None:
            os.environ.pop("AQA_HOME", None)
        else:
            os.environ["AQA_HOME"] = env_home


def synthetic_video(clips: int, fps: float = 25.0) -> Path:
    """A 640x360 moving scene of exactly ``clips`` 32-frame clips (cached under bench/out/videos)."""
    from aqa_cli.synthetic import moving_scene, write_video

    path = OUT_DIR / "videos" / f"scene_{clips}clips_640x360.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".partial.mp4")
        write_video(tmp, moving_scene(32 * clips, 360, 640), fps)
        os.replace(tmp, path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--backbones", nargs="+", default=["vst", "i3d"], choices=["vst", "i3d"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-extract", action="store_true", help="model only, skip the aqa extract-features runs")
    p.add_argument("--score", action="store_true",
                   help="also the marginal s/clip of `aqa score` at its default precision (auto: bf16 where the "
                        "device computes it), no feature cache, against the model alone")
    p.add_argument("--dry-run", action="store_true", help="tiny models and inputs, one round: checks the script runs")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="model-only times: wall time, or CPU time of one thread (--threads 1; for a shared machine)")
    args = p.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            p.error("--clock cpu needs --threads 1 (CPU time of several threads counts their spinning too)")
        global CLOCK
        CLOCK = time.process_time
    import torch

    from aqa_cli.backbones import native_bf16, resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    native = native_bf16(device)
    rounds = 1 if args.dry_run else args.rounds
    report = {"machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "clock": args.clock,
                          "device": str(device),
                          "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                          "native_bf16": native, "torch": torch.__version__, "load_average_before": os.getloadavg()},
              "gemm_gflop_per_s": {"fp32": gemm_peak(torch.float32, device, 0.2 if args.dry_run else 2.0),
                                   "bf16": gemm_peak(torch.bfloat16, device, 0.2 if args.dry_run else 2.0)},
              "backbones": {}}
    for name in args.backbones:
        print(f"{name}: model only ...", file=sys.stderr, flush=True)
        result = model_only(name, device, native, args.batch, rounds, args.dry_run)
        for mode, m in result["modes"].items():
            dtype = "bf16" if "bf16" in mode else "fp32"
            m["share_of_gemm_peak"] = m["gflop_per_s"] / report["gemm_gflop_per_s"][dtype]
        if not (args.no_extract or args.dry_run):
            print(f"{name}: aqa extract-features on 1 and 5 clips ...", file=sys.stderr, flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
            if name == "vst":
                _prepare_vst_home()
                env["AQA_HOME"] = str(VST_HOME)
            short, long = synthetic_video(1), synthetic_video(5)
            result["extract"] = [extract_marginal(name, args.device, precision, short, long, (1, 5), env, rounds)
                                 for precision in (["fp32", "bf16"] if native else ["fp32"])]
            if args.score:
                # As users run it: the default precision, auto, which resolves to bf16 where it is native.
                scored = extract_marginal(name, args.device, "auto", short, long, (1, 5), env, rounds,
                                          command="score")
                scored["precision"] = "bf16" if native else "fp32"  # what auto ran
                scored["requested"] = "auto"
                result["extract"].append(scored)
        report["backbones"][name] = result
    report["machine"]["load_average_after"] = os.getloadavg()
    if not args.dry_run:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / "backbones.json").write_text(json.dumps(report, indent=2) + "\n")

    m = report["machine"]
    g = report["gemm_gflop_per_s"]
    print(f"{m['cpu']} ({m['device']}), {m['threads']} threads, {m['clock']} clock, native bf16: {m['native_bf16']}, "
          f"load average "
          f"{m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after; "
          f"GEMM peak {g['fp32']:.0f} GFLOP/s fp32, {g['bf16']:.1f} bf16")
    print("| backbone | mode | s/clip | × reference | GFLOP/s | share of GEMM peak | cosine vs reference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in report["backbones"].items():
        for mode, x in r["modes"].items():
            print(f"| {name} | {mode} | {x['s_per_clip']:.3f} | {x['ratio_to_reference']:.2f} | "
                  f"{x['gflop_per_s']:.0f} | {x['share_of_gemm_peak']:.2f} | {x['cosine_min_vs_reference']:.6f} |")
        for skipped in r["skipped"]:
            print(f"| {name} | {skipped}: skipped | | | | | |")
    for name, r in report["backbones"].items():
        for e in r.get("extract", []):
            ref = r["modes"][r["reference"]]["s_per_clip"]
            # The fastest model-only mode of the same precision: what the pipeline adds on top of the model.
            same = [x["s_per_clip"] for mode, x in r["modes"].items() if ("bf16" in mode) == (e["precision"] == "bf16")]
            asked = f"auto → {e['precision']}" if e.get("requested") == "auto" else e["precision"]
            print(f"{name} `aqa {e.get('command', 'extract-features')} --precision {asked}`: marginal "
                  f"{e['marginal_s_per_clip']:.2f} s/clip ({ref / e['marginal_s_per_clip']:.2f}× the model-only "
                  f"{r['reference']}; {e['marginal_s_per_clip'] / min(same):.2f}× its own fastest model-only mode); "
                  f"1 clip {e['wall_s']['short']:.1f} s, 5 clips {e['wall_s']['long']:.1f} s (fastest of "
                  f"{len(e['rounds_wall_s']['short'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
