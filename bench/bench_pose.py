"""Pose backbone and pose head timings on this machine (one thread).

* pose extraction: frames per second of ``video_features`` with the pose backbone on ``arm_wrestling.mp4``
  (decode, resize, BlazePose, clip features), best of 2 runs;
* heads: inference time of the ``pose`` head (K = 10 exemplars, the direct variant, and K = 10 with the
  per-frame step branch of four classes) and of the ``mtl`` head
  on one 60-clip video, best of 20 calls, untrained weights (speed does not depend on their values).

Run: ``PYTHONPATH=.:<mediapipe folder> OMP_NUM_THREADS=1 python bench/bench_pose.py [VIDEO]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch


def best(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    from aqa_cli.backbones import create_backbone
    from aqa_cli.backbones.pose import FEATURE_DIM
    from aqa_cli.extract import video_features
    from aqa_cli.heads import create_head

    video = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/videos/arm_wrestling.mp4"
    bb = create_backbone("pose", device="cpu")
    holder = {}

    def extract() -> None:
        holder["r"] = video_features(video, bb)

    sec = best(extract, 2)
    person = holder["r"].frames["person"]
    fps = person.size / sec
    print(f"pose extraction: {person.size} frames in {sec:.2f} s = {fps:.1f} frames/s "
          f"({person.sum()} with a person)")

    rng = np.random.default_rng(0)
    clips = 60
    x = torch.from_numpy(rng.normal(size=(1, clips, FEATURE_DIM)).astype(np.float32))
    bank = [rng.normal(size=(int(rng.integers(3, 8)), FEATURE_DIM)).astype(np.float32) for _ in range(256)]
    timings = {}
    steps = {"step_classes": ["approach", "takeoff", "flight", "entry"]}  # the finediving preset's
    for label, cfg in (("pose (K=10 exemplars)", {"exemplars": True}), ("pose direct", {"exemplars": False}),
                       ("pose (K=10) + per-frame steps", {"exemplars": True, **steps})):
        head = create_head("pose", {**cfg, "bank_clips": 8, "bank_id_len": 8, "score_max": 30.0}).eval()
        head.set_bank(bank, rng.uniform(0, 30, 256), [f"v{i:03d}" for i in range(256)])
        with torch.inference_mode():
            head(x)
            timings[label] = best(lambda: head(x), 20)
    mtl = create_head("mtl", {"in_dim": FEATURE_DIM, "score_max": 30.0}).eval()
    with torch.inference_mode():
        mtl(x)
        timings["mtl"] = best(lambda: mtl(x), 20)
    for label, t in timings.items():
        print(f"{label}: {t * 1000:.2f} ms per video ({clips} clips); / mtl = {t / timings['mtl']:.2f}")
    per_video = clips * 32 / fps
    print(f"pose head / pose extraction of the same {clips}-clip video: "
          f"{timings['pose (K=10 exemplars)'] / per_video:.5f}")


if __name__ == "__main__":
    main()
