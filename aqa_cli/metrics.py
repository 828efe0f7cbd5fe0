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
