"""The figures AQA papers report, computed one way everywhere."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def spearman(pred: np.ndarray, target: np.ndarray) -> float:
    return float(stats.spearmanr(pred, target).statistic)


def pearson(pred: np.ndarray, target: np.ndarray) -> float:
    return float(stats.pearsonr(pred, target).statistic)


def relative_l2(pred: np.ndarray, target: np.ndarray) -> float:
    """R-ℓ2 × 100: 100 · mean(((p − y) / (max y − min y))²), the range taken from the targets."""
    span = float(np.max(target) - np.min(target)) or 1.0
    return float(100.0 * np.mean(((np.asarray(pred) - np.asarray(target)) / span) ** 2))


def mae(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(target))))


def fisher_z_mean(rhos: list[float]) -> float:
    """tanh(mean(atanh ρ_i)): how AQA papers average correlations across actions or targets."""
    clipped = [max(min(r, 1 - 1e-12), -1 + 1e-12) for r in rhos]
    return math.tanh(sum(math.atanh(r) for r in clipped) / len(clipped))


def report(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    return {"n": int(len(target)), "spearman": spearman(pred, target), "pearson": pearson(pred, target),
            "rl2_x100": relative_l2(pred, target), "mae": mae(pred, target)}


# ------------------------------------------------------------------------------------------------ explanations
#
# A head explains a score S through per-clip weights w_t and scores s_t (S0 = Σ_t w_t·s_t, before additive terms).
# If that explanation were true, removing clip t would renormalise the other weights and leave their scores, so
# the score would move by the *predicted effect* D^_t = w_t·(s_t − S0) / (1 − w_t). The *measured effect*
# D_t = S − S(the same head on the video without clip t) is what removing it really does (aqa_cli.effects).
# *Faithfulness* is Spearman ρ(D^, D) over one video's clips: 1 when the explanation ranks the clips as their
# real effects do, about 0 when it says nothing about them.


def predicted_effects(weights: np.ndarray, clip_scores: np.ndarray) -> np.ndarray:
    """D^_t = w_t·(s_t − S0) / (1 − w_t): what removing clip t would do if w·s were the whole story.

    A clip holding all the weight (w_t = 1, a one-clip video) has no defined effect: NaN."""
    w = np.asarray(weights, dtype=np.float64)
    s = np.asarray(clip_scores, dtype=np.float64)
    s0 = float(np.sum(w * s))
    rest = 1.0 - w
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(rest > 1e-12, w * (s - s0) / np.where(rest > 1e-12, rest, 1.0), np.nan)


def faithfulness(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Spearman ρ between predicted and measured clip effects over one video's clips.

    An explanation that is constant over the clips (CoFInAl's equal clip scores give D^ = 0 everywhere) ranks
    nothing, so it scores 0; fewer than three clips with defined effects give NaN (no ranking to compare)."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    ok = np.isfinite(p) & np.isfinite(m)
    p, m = p[ok], m[ok]
    if len(p) < 3:
        return float("nan")
    scale = max(float(np.max(np.abs(m))), float(np.max(np.abs(p))), 1e-30)
    if np.ptp(p) <= 1e-9 * scale or np.ptp(m) <= 1e-9 * scale:
        return 0.0
    return spearman(p, m)
