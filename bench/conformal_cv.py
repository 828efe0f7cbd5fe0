"""How honest are the shipped Fis-V intervals and domain check? Measured by cross-validation inside the 400 training
videos, never on test videos.

    python bench/conformal_cv.py [--level 0.9] [--repeats 20]

Intervals: the default heads' out-of-fold residuals (weights/fisv-{tes,pcs}-additive.log.json; the total pairs the
two) split 5 ways, ``--repeats`` times: the half-width from four fifths, coverage and width on the fifth. Then the
normalised score |residual| / (spread + c), with the spread of each video's out-of-fold predictions over the CV
repeats (the only model disagreement training can give without refitting, PCS only: the TES log keeps one repeat)
and c chosen on the calibration part. Domain: held-out videos flagged against a model calibrated without them
(nested folds), and the same videos' features with their channels permuted, and constant (one clip repeated).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aqa_cli.calibration import (  # noqa: E402
    Calibration, DomainModel, conformal_quantile, domain_flag_rate_cv, video_descriptor,
)
from aqa_cli.dataset import load_feature_set  # noqa: E402

FISV = ROOT.parent / "shared" / "data" / "fisv"


def normalised_cv(cal: Calibration, level: float, repeats: int, seed: int = 0) -> dict[str, float]:
    """Coverage and mean width of |r| / (sd + c) intervals, c picked on each calibration part (narrowest there)."""
    sd = cal.oof.std(0, ddof=1)
    res = np.abs(cal.oof[0] - cal.targets)
    grid = np.array([0.25, 0.5, 1, 2, 4, 8, 1e3]) * float(np.mean(sd))
    rng = np.random.default_rng(seed)
    covered, widths, cs = [], [], []
    for _ in range(repeats):
        assign = rng.permutation(cal.n) % 5
        for k in range(5):
            c_part, h = assign != k, assign == k
            best = min(grid, key=lambda c: conformal_quantile(res[c_part] / (sd[c_part] + c), level)
                       * float(np.mean(sd[c_part] + c)))
            q = conformal_quantile(res[c_part] / (sd[c_part] + best), level)
            covered.append(float(np.mean(res[h] <= q * (sd[h] + best))))
            widths.append(float(np.mean(2 * q * (sd[h] + best))))
            cs.append(best)
    return {"coverage": float(np.mean(covered)), "mean_width": float(np.mean(widths)), "median_c": float(np.median(cs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--domain-repeats", type=int, default=2)
    args = parser.parse_args()
    tes = pcs = None
    print(f"| target | CV coverage at {args.level:.0%} (± sd over folds) | mean width | half-width shipped (all 400) |")
    print("| --- | --- | --- | --- |")
    cals = {}
    for target in ("TES", "PCS"):
        log = json.loads((ROOT / "weights" / f"fisv-{target.lower()}-additive.log.json").read_text())
        data = load_feature_set(FISV / "features", FISV / "train.csv", target)
        cals[target] = Calibration.from_log(log, dict(zip(data.ids, map(float, data.targets))))
    tes, pcs = cals["TES"], cals["PCS"]
    cals["total"] = tes.combined(pcs)
    for target, cal in cals.items():
        cv = cal.cv_coverage(args.level, repeats=args.repeats)
        print(f"| {target} | {cv['coverage']:.3f} ± {cv['coverage_sd']:.3f} | {cv['mean_width']:.2f} "
              f"| ±{cal.half_width(args.level):.2f} |")
    norm = normalised_cv(pcs, args.level, args.repeats)
    plain = Calibration(pcs.ids, pcs.targets, pcs.oof[:1]).cv_coverage(args.level, repeats=args.repeats)
    print(f"\nPCS, normalised by the repeats' spread (c chosen inside each calibration part, median c "
          f"{norm['median_c']:.2f}): coverage {norm['coverage']:.3f}, mean width {norm['mean_width']:.2f}; plain "
          f"residuals on the same (repeat-0) predictions: coverage {plain['coverage']:.3f}, mean width "
          f"{plain['mean_width']:.2f}")
    sd = pcs.oof.std(0, ddof=1)
    from aqa_cli.metrics import spearman

    print(f"Spearman ρ(spread over repeats, |out-of-fold error|): {spearman(sd, np.abs(pcs.oof[0] - pcs.targets)):.3f}")

    descriptors = np.stack([video_descriptor(f) for f in data.features])
    rate = domain_flag_rate_cv(descriptors, repeats=args.domain_repeats)
    print(f"\nDomain check, held-out Fis-V videos flagged: {rate['flag_rate']:.2%} of {rate['videos']} "
          f"(alpha {rate['alpha']})")
    model = DomainModel.fit_calibrated(descriptors)
    perm = np.random.default_rng(0).permutation(descriptors.shape[1] // 2)
    permuted = [model.p_value(video_descriptor(np.asarray(f, np.float32)[:, perm])) < model.alpha
                for f in data.features]
    constant = [model.p_value(video_descriptor(np.repeat(np.asarray(f[:1], np.float32), len(f), 0))) < model.alpha
                for f in data.features]
    print(f"channels permuted: {sum(permuted)} of {len(permuted)} flagged; one clip repeated (a constant video): "
          f"{sum(constant)} of {len(constant)} flagged")


if __name__ == "__main__":
    main()
