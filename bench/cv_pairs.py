"""Two cross-validation runs compared fold by fold, from their training logs.

    python bench/cv_pairs.py weights/fisv-pcs-additive.log.json RUN/pcs-k0.log.json

Both runs must have been trained on the same data with the same seed, folds and repeats, so that fold i of
one and fold i of the other held out the very same videos (`aqa train` draws the folds from the seed alone).
Prints each run's mean fold ρ, the mean of the paired differences (first minus second) with its standard
error over the folds, and in how many folds the first run was ahead. Pairing removes the fold-to-fold
spread that the two runs share, which is most of the noise of a 5-fold figure on 400 videos.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    logs = [json.loads(Path(p).read_text()) for p in argv]
    for key in ("data_sha256", "seed", "target"):
        if logs[0][key] != logs[1][key]:
            raise SystemExit(f"the runs differ in {key}: their folds do not pair")
    cvs = [log["cv"] for log in logs]
    if (cvs[0]["folds"], cvs[0].get("repeats", 1)) != (cvs[1]["folds"], cvs[1].get("repeats", 1)):
        raise SystemExit("the runs differ in folds or repeats: their folds do not pair")
    a, b = (np.asarray(cv["fold_spearman"], dtype=np.float64) for cv in cvs)
    d = a - b
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    print(f"{logs[0]['target']}, {len(d)} folds ({cvs[0].get('repeats', 1)} × {cvs[0]['folds']})")
    print(f"  {Path(argv[0]).name}: mean fold ρ {a.mean():.4f}")
    print(f"  {Path(argv[1]).name}: mean fold ρ {b.mean():.4f}")
    print(f"  paired difference {d.mean():+.4f} ± {se:.4f} (s.e.), first ahead in {int((d > 0).sum())} of {len(d)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
