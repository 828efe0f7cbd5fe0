"""Out-of-fold figures of shipped fold ensembles, alone and averaged across heads.

    python bench/cv_blend.py TES weights/fisv-tes-*.safetensors
    python bench/cv_blend.py PCS weights/fisv-pcs-*.safetensors
    python bench/cv_blend.py TES RUN/fisv-tes-cofinal.safetensors --parts   # also each additive term alone

Every file must be a fold ensemble (`aqa train --folds K --final folds`) trained on the
same data with the same seed, so that fold k's model in each file never saw the same
videos. Each video is then scored by the fold models that did not see it, and the
heads' scores are averaged: a cross-validated estimate of what averaging the heads
would give, computed from the shipped files alone (nothing is trained).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FISV = REPO.parent / "shared" / "data" / "fisv"


def out_of_fold(path: Path, data) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Each video's score by the fold model that did not see it, the fold of each video, and the score's
    additive terms (e.g. CoFInAl's fine sub-grade step) by the same models."""
    import torch

    from aqa_cli.heads.checkpoint import load_head
    from aqa_cli.training import fold_assignment

    loaded = load_head(path)
    meta = loaded.metadata
    if meta.get("final") != "folds":
        raise SystemExit(f"{path}: not a fold ensemble (trained with --final {meta.get('final')})")
    if meta["data_sha256"] != data.fingerprint():
        raise SystemExit(f"{path}: trained on other data than {FISV}")
    cv = json.loads(meta["cv"])
    assign = fold_assignment(data.targets, cv["folds"], int(meta["seed"]))
    oof = np.empty(len(data))
    parts: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for k, member in enumerate(loaded.model.members):
            for i in np.flatnonzero(assign == k):
                out = member(torch.from_numpy(np.asarray(data.features[i], dtype=np.float32))[None])
                oof[i] = float(out.score)
                for name, value in out.additive.items():
                    parts.setdefault(name, np.zeros(len(data)))[i] = float(value)
    return oof, assign, parts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    sys.path.insert(0, str(REPO))
    from aqa_cli.dataset import load_feature_set
    from aqa_cli.metrics import spearman

    show_parts = "--parts" in argv
    argv = [a for a in argv if a != "--parts"]
    target, paths = argv[0], [Path(p) for p in argv[1:]]
    data = load_feature_set(FISV / "features", FISV / "train.csv", target)
    preds, assign = {}, None
    for path in paths:
        preds[path], a, parts = out_of_fold(path, data)
        if show_parts:
            for name, value in parts.items():
                print(f"{path.stem}: out-of-fold ρ of the score without {name} "
                      f"{spearman(preds[path] - value, data.targets):.3f}, of {name} alone "
                      f"{spearman(value, data.targets):.3f}")
        if assign is not None and not np.array_equal(a, assign):
            raise SystemExit(f"{path}: its folds differ from {paths[0]} (another seed or fold count)")
        assign = a
    folds = int(assign.max()) + 1
    print(f"{target}: {len(data)} videos, {folds} folds; mean fold ρ and pooled out-of-fold ρ")
    print("| heads averaged | CV ρ per fold | CV ρ mean | out-of-fold ρ |")
    print("| --- | --- | --- | --- |")
    for r in range(1, len(paths) + 1):
        for combo in itertools.combinations(paths, r):
            p = np.mean([preds[c] for c in combo], axis=0)
            rhos = [spearman(p[assign == k], data.targets[assign == k]) for k in range(folds)]
            name = " + ".join(c.stem for c in combo)
            print(f"| {name} | {' '.join(f'{x:.3f}' for x in rhos)} | {np.mean(rhos):.3f} | "
                  f"{spearman(p, data.targets):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
