"""A linear ridge probe on mean-pooled clip features, under the same repeated K-fold CV as `aqa train`.

    python bench/ridge_probe.py                 # TES and PCS, 3 x 5 folds, seed 0 (the shipped heads' folds)
    python bench/ridge_probe.py --repeats 5 --targets PCS

Why: the probe is additive per clip (score = mean over clips of w·x_t + b), so its explanation is
exact, and issue 13 reports it as accurate held out as the papers' heads. It is the baseline a
faithful head has to beat. The ridge strength is chosen inside each training fold by exact
leave-one-out error (no peeking at the held-out fold); features are standardised on the training
fold only. The folds are `aqa_cli.training.fold_assignment` with the same seeds as
`aqa train --folds 5 --repeats R --seed 0`, so the figures pair fold by fold with weights/README's.
Prints a Markdown table; writes nothing.

``--blend`` also averages the probe with a shipped fold ensemble's out-of-fold scores (``bench/cv_blend.py``'s
reading of the file: fold k's model scores the videos of fold k), on repeat 0, whose folds are the file's:

    python bench/ridge_probe.py --blend weights/fisv-tes-additive.safetensors weights/fisv-pcs-additive.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FISV = REPO.parent / "shared" / "data" / "fisv"
def ridge_fit_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray) -> tuple[np.ndarray, float]:
    """The additive head's own probe (`ridge_on_video_means`: standardised columns, leave-one-out strength)
    fitted on the training rows; its predictions for the test rows and the strength it chose."""
    from aqa_cli.heads.additive import ridge_on_video_means

    w, b, alpha = ridge_on_video_means(x_tr, y_tr, None)
    return x_te @ w + b, alpha


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from aqa_cli.metrics import spearman as rho  # the figure aqa train reports

    return rho(a, b)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["TES", "PCS"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blend", nargs="*", default=[], type=Path,
                   help="fold-ensemble head files (--final folds, seed 0) to average with the probe, on repeat 0")
    args = p.parse_args(argv)
    if not FISV.is_dir():
        print(f"skipped: {FISV} is absent (the Fis-V features live in ../shared)")
        return 0
    sys.path.insert(0, str(REPO))
    from aqa_cli.dataset import load_feature_set
    from aqa_cli.training import REPEAT_SEED_STRIDE, fold_assignment

    print("| target | CV folds | ridge probe CV ρ mean ± std (± s.e.) | out-of-fold ρ per repeat | LOO-chosen α (median) |")
    print("| --- | --- | --- | --- | --- |")
    for target in args.targets:
        data = load_feature_set(FISV / "features", FISV / "train.csv", target)
        x = np.stack([np.asarray(f, dtype=np.float64).mean(0) for f in data.features])
        y = np.asarray(data.targets, dtype=np.float64)
        per_repeat, fold_rhos, alphas = [], [], []
        for r in range(args.repeats):
            assign = fold_assignment(data.targets, args.folds, args.seed + r * REPEAT_SEED_STRIDE)
            oof = np.empty(len(y))
            for k in range(args.folds):
                te, tr = assign == k, assign != k
                oof[te], alpha = ridge_fit_predict(x[tr], y[tr], x[te])
                alphas.append(alpha)
                fold_rhos.append(spearman(oof[te], y[te]))
            per_repeat.append(spearman(oof, y))
        # Mean and s.e. over all repeats x folds, as `aqa train --repeats` reports them (CVResult.se_rho).
        sd = float(np.std(fold_rhos, ddof=1))
        print(f"| {target} | {args.repeats} × {args.folds} | {np.mean(fold_rhos):.3f} ± {sd:.3f} "
              f"(± {sd / np.sqrt(len(fold_rhos)):.3f}) | {' '.join(f'{v:.3f}' for v in per_repeat)} | "
              f"{np.median(alphas):.0f} |")
    if args.blend:
        blend_table(args.blend, args.folds)
    return 0


def blend_table(paths: list[Path], folds: int) -> None:
    """Mean fold ρ of each file's out-of-fold scores, of the probe's on the same folds, and of their average."""
    from cv_blend import out_of_fold

    from aqa_cli.dataset import load_feature_set
    from aqa_cli.heads.checkpoint import load_head

    print()
    print("| file | target | its CV ρ (repeat 0) | ridge probe, same folds | average of the two |")
    print("| --- | --- | --- | --- | --- |")
    for path in paths:
        target = load_head(path).target
        data = load_feature_set(FISV / "features", FISV / "train.csv", target)
        oof, assign, _ = out_of_fold(path, data)
        x = np.stack([np.asarray(f, dtype=np.float64).mean(0) for f in data.features])
        y = np.asarray(data.targets, dtype=np.float64)
        probe = np.empty(len(y))
        for k in range(folds):
            te = assign == k
            probe[te], _ = ridge_fit_predict(x[~te], y[~te], x[te])

        def fold_mean(pred: np.ndarray) -> float:
            return float(np.mean([spearman(pred[assign == k], y[assign == k]) for k in range(folds)]))

        print(f"| `{path.name}` | {target} | {fold_mean(oof):.3f} | {fold_mean(probe):.3f} | "
              f"{fold_mean((oof + probe) / 2):.3f} |")


if __name__ == "__main__":
    raise SystemExit(main())
