"""Scoring-head speed on this machine: inference per video and training per head and target.

    python bench/bench_heads.py                 # all heads, 2 timed training epochs each
    python bench/bench_heads.py --heads gdlt --train-epochs 1

Inference: one 200-clip video of 1024-d features, eval mode, the median of
``--repeats`` forwards (target: < 10 ms on the CPU). Training: ``--train-epochs``
epochs at the Fis-V preset's settings on the real Fis-V features (400 videos,
124-clip crops, batch 32), scaled to the epochs a shipped head was trained for
(target: ≤ 20 minutes per head and target). Where a shipped checkpoint's log
records its actual training time, that is printed beside the estimate. Figures
are ratios to the targets, measured in one run (these machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import cpu_model

REPO = Path(__file__).resolve().parents[1]
FISV = REPO.parent / "shared" / "data" / "fisv"
INFER_TARGET_MS = 10.0
TRAIN_TARGET_MIN = 20.0


def median_ms(forward, repeats: int) -> float:
    """Median wall time of ``forward()`` in ms, after three warm-up calls, without autograd."""
    import torch

    with torch.inference_mode():
        for _ in range(3):
            forward()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            forward()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", nargs="+", default=None, help="heads to time (default: those with Fis-V settings)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=30, help="timed inference forwards (default 30)")
    p.add_argument("--train-epochs", type=int, default=2, help="timed training epochs (0: skip training)")
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, str(REPO))
    from aqa_cli.heads import create_head, list_heads
    from aqa_cli.heads.checkpoint import load_head
    from aqa_cli.presets import load_preset

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = load_preset("fisv-tes")
    # The long-term heads that have Fis-V settings (mtl and pose are timed by bench_pose.py).
    heads = args.heads or [h for h in list_heads() if h in preset.heads]
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in heads:
        torch.manual_seed(0)
        head = create_head(name, preset.model_settings(name)).eval()
        x = torch.randn(1, 200, 1024)
        ms = median_ms(lambda: head(x), args.repeats)
        row = {"head": name, "params": sum(q.numel() for q in head.parameters()), "infer_ms": ms,
               "infer_ratio": ms / INFER_TARGET_MS}
        shipped = REPO / "weights" / f"fisv-tes-{name}.safetensors"
        if shipped.is_file():  # the file users run: a fold ensemble costs one forward per member
            loaded = load_head(shipped)
            row["shipped_members"] = loaded.members
            row["shipped_ms"] = median_ms(lambda: loaded.model(x), args.repeats)
            row["shipped_ratio"] = row["shipped_ms"] / INFER_TARGET_MS
        rows.append(row)
    if args.train_epochs and (FISV / "train.csv").is_file():
        from aqa_cli.dataset import load_feature_set
        from aqa_cli.training import TrainSettings, fit

        data = load_feature_set(FISV / "features", FISV / "train.csv", "TES")
        for row in rows:
            name = row["head"]
            shipped = REPO / "weights" / f"fisv-tes-{name}.log.json"
            log = json.loads(shipped.read_text()) if shipped.is_file() else None
            values = {**preset.train_settings(name), "crop": preset.train_clips}
            full_epochs = log["train_settings"]["epochs"] if log else values.get("epochs", 200)
            runs = (log["cv"]["folds"] if log and "cv" in log else 1) if log else 1
            values["epochs"] = args.train_epochs
            res = fit(name, preset.model_settings(name), data, TrainSettings.from_dict(values), seed=0)
            per_epoch = res.seconds / args.train_epochs
            # A fold model sees (K-1)/K of the videos; a final model all of them. A shipped single model
            # (--final all) after K-fold CV costs K fold fits plus one on everything.
            share = (runs - 1) / runs if runs > 1 else 1.0
            final_fits = 1 if runs > 1 and log and log.get("history") else 0
            estimate_min = per_epoch * full_epochs * (runs * share + final_fits) / 60
            row.update(epoch_s=per_epoch, epochs=full_epochs, models=runs + final_fits, train_min_est=estimate_min,
                       train_ratio=estimate_min / TRAIN_TARGET_MIN,
                       train_min_logged=(log["total_seconds"] / 60 if log else None))
    elif args.train_epochs:
        print(f"training not timed: {FISV} is absent")
    header = f"{'head':8} {'params':>10} {'infer ms':>9} {'/10ms':>6} {'epoch s':>8} {'models×epochs':>14} " \
             f"{'train min (est)':>15} {'/20min':>7} {'train min (log)':>15}"
    print(header)
    for r in rows:
        print(f"{r['head']:8} {r['params']:>10,} {r['infer_ms']:>9.2f} {r['infer_ratio']:>6.2f} "
              f"{r.get('epoch_s', float('nan')):>8.1f} {str(r.get('models', '-')) + '×' + str(r.get('epochs', '-')):>14} "
              f"{r.get('train_min_est', float('nan')):>15.1f} {r.get('train_ratio', float('nan')):>7.2f} "
              f"{(r.get('train_min_logged') or float('nan')):>15.1f}")
        if "shipped_ms" in r:
            print(f"{'':8} shipped weights/fisv-tes-{r['head']}.safetensors ({r['shipped_members']} members): "
                  f"{r['shipped_ms']:.2f} ms, {r['shipped_ratio']:.2f} × the 10 ms target")
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "heads.json").write_text(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(),
                                                "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
