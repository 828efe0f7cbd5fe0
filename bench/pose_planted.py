"""The pose head on planted dives (``aqa_cli.synthetic.planted_dives``): the exemplar head against the direct
baseline over seeds, and what the per-frame step branch owes to its parts.

Per seed (the seed of the training draw and of the model), 160 training and 80 held-out dives:

* execution ρ (no labels) and dive-score ρ (× DD from the labels) of the exemplar head and the direct baseline;
* per-frame step accuracy and mean |boundary error| in frames, for the full step branch, without the run
  projection (``frame_runs = 0``: the decoded clip tokens only) and without the boundary convolution's
  context (``frame_kernel = 1``), next to the error of a perfect classifier of whole 8-frame runs.

Run: ``OMP_NUM_THREADS=1 python bench/pose_planted.py [--seeds 0 1 2]`` (about 20 s per fit on this CPU).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from aqa_cli.dataset import load_feature_set
from aqa_cli.metrics import spearman
from aqa_cli.synthetic import DIVE_RUN_DIM, DIVE_RUNS, DIVE_STEPS, planted_dives, planted_step_figures
from aqa_cli.training import TrainSettings, fit, predict, predict_set

CONFIG = {"in_dim": 40, "hidden_dim": 64, "n_head": 4, "n_layers": 2, "dropout": 0.0, "k_exemplars": 8,
          "bank_size": 64, "step_classes": DIVE_STEPS, "difficulty_column": "difficulty", "execution_min": 0.0,
          "execution_max": 30.0, "score_min": 0.0, "score_max": 120.0, "frame_runs": DIVE_RUNS,
          "run_dim": DIVE_RUN_DIM}
SETTINGS = TrainSettings(epochs=40, batch_size=16, optimizer="adamw", lr=1e-3, weight_decay=1e-2, crop=0,
                         eval_every=0)
VARIANTS = {"exemplar head": {}, "direct baseline": {"exemplars": False},
            "steps without runs": {"frame_runs": 0}, "steps without context": {"frame_kernel": 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| seed | variant | execution ρ | dive score ρ | step accuracy | boundary error (frames) | "
          "perfect 8-frame runs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            planted_dives(root / "train", 160, seed=1 + 10 * seed)
            rows = planted_dives(root / "test", 80, seed=2 + 10 * seed)
            train = load_feature_set(root / "train", root / "train" / "labels.csv", "dive_score")
            test = load_feature_set(root / "test", root / "test" / "labels.csv", "dive_score")
            execution = np.array([float(r["execution"]) for r in rows])
            for name, change in VARIANTS.items():
                head = fit("pose", {**CONFIG, **change}, train, SETTINGS, seed=seed).head
                rho_exec = spearman(predict(head, test.features), execution)
                rho = spearman(predict_set(head, test), test.targets)
                steps = planted_step_figures(head, test)
                acc, err, run_err = steps["accuracy"], steps["boundary_error"], steps["run_boundary_error"]
                print(f"| {seed} | {name} | {rho_exec:.3f} | {rho:.3f} | {acc:.3f} | {err:.2f} | {run_err:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
