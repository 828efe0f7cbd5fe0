"""The cost of measuring what each clip does to the score (``aqa score``'s ``effect`` column).

    python bench/bench_effects.py                  # every shipped Fis-V head, a 300-clip video, 2 threads
    python bench/bench_effects.py --clips 300 --threads 1 --repeats 3

For a video of T clips the effects take T head passes on T − 1 clips each, batched
(:func:`aqa_cli.effects.measured_effects`). Per shipped head this prints the median wall
time of the effects for one video (target: < 2 s for 300 clips on the CPU), one plain head
pass on the same video, and their ratio, all measured in this run. The features are a real
Fis-V video's, tiled to the length asked for (random features without ../shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import OUT_DIR, cpu_model

REPO = Path(__file__).resolve().parents[1]
FISV = REPO.parent / "shared" / "data" / "fisv" / "features"
TARGET_S = 2.0


def features_of_length(clips: int):  # -> np.ndarray [clips, 1024]
    import numpy as np

    files = sorted(FISV.glob("*.npy")) if FISV.is_dir() else []
    if not files:
        return np.random.default_rng(0).normal(size=(clips, 1024)).astype(np.float32)
    longest = max(files, key=lambda f: np.load(f, mmap_mode="r").shape[0])
    real = np.load(longest).astype(np.float32)
    return np.concatenate([real] * (clips // len(real) + 1))[:clips]


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pattern", default="fisv-*", help="shipped heads to time (glob in weights/)")
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, str(REPO))
    from aqa_cli.effects import measured_effects
    from aqa_cli.heads.checkpoint import load_head
    from aqa_cli.scoring import run_head

    torch.set_num_threads(args.threads)
    x = features_of_length(args.clips)
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {args.threads} thread(s), {args.clips} clips")
    rows = []
    for path in sorted((REPO / "weights").glob(f"{args.pattern}.safetensors")):
        h = load_head(path)
        plain = median_s(lambda: run_head(h, x), args.repeats)
        effects = median_s(lambda: measured_effects(h.model, x), args.repeats)
        rows.append({"head": path.stem, "effects_s": effects, "head_pass_s": plain, "ratio": effects / plain,
                     "of_target": effects / TARGET_S})
        print(f"{path.stem:24s} effects {effects:6.2f} s   one head pass {1000 * plain:7.1f} ms   "
              f"ratio {effects / plain:6.0f}×   {effects / TARGET_S:.2f} of the {TARGET_S:g} s target", flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "bench_effects.json"
    out.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "clips": args.clips, "rows": rows},
                              indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
