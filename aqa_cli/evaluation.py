"""``aqa evaluate``: a trained head against labelled features, with the figures AQA papers report, and how
faithful the head's per-clip explanations are (:func:`aqa_cli.effects.explanation_report`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aqa_cli.dataset import FeatureSet, load_feature_set, read_labels
from aqa_cli.errors import AqaError
from aqa_cli.heads.checkpoint import load_head
from aqa_cli.metrics import fisher_z_mean, report
from aqa_cli.training import predict_set


@dataclass
class Evaluation:
    weights: Path
    target: str
    head: str
    metrics: dict[str, float]
    predictions: dict[str, float]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"weights": str(self.weights), "head": self.head, "target": self.target, **self.metrics,
                "notes": self.notes}


def evaluate(features: str | Path, labels: str | Path, weights: list[str | Path], targets: list[str] | None = None,
             *, device: str = "cpu", trust_features: bool = False, explain: bool = False, level: float = 0.9,
             on_progress: Callable[[str, int, int | None], None] | None = None,
             ) -> tuple[list[Evaluation], float | None]:
    """Evaluate each checkpoint on its target (``targets`` pairs with ``weights``, or one target serves all,
    or none: each checkpoint's own). Returns the evaluations and, for several, the Fisher-z mean ρ.

    ``explain`` adds the faithfulness of each head's explanations (mean and median over videos of ρ(D^, D))
    and the deletion-curve area to its metrics. Off by default: it costs one batched head pass per clip of every
    video (minutes on a hundred videos, growing with the cube of their clip count for the interp head), where
    the metrics take one pass per video. ``on_progress(what, done, total)`` reports each step as it goes.

    A calibrated head also gets its intervals checked (:func:`interval_report`): on these videos, the share inside
    their ``level`` interval and the mean width, beside the coverage its cross-validation measured; and the share
    its domain check flags."""
    report_progress = on_progress or (lambda what, done, total: None)
    if not weights:
        raise AqaError("no --weights given", fix="pass one or more head checkpoints (.safetensors)")
    targets = list(targets or [])
    if len(targets) not in (0, 1, len(weights)):
        raise AqaError(f"{len(targets)} targets for {len(weights)} checkpoints",
                       fix="give one --target, one per --weights, or none to use each checkpoint's own")
    lab = read_labels(labels)
    datasets: dict[str, FeatureSet] = {}  # one read of the features per target, however many checkpoints
    results = []
    for i, w in enumerate(weights):
        name = f"{Path(w).name} ({i + 1}/{len(weights)})"
        report_progress(f"{name}: loading", 0, None)
        loaded = load_head(w, device=device)
        target = targets[i] if len(targets) == len(weights) else (targets[0] if targets else loaded.target)
        if not target:
            raise AqaError("the checkpoint records no target", path=w, fix="pass --target")
        data = datasets.get(lab.column(target))
        if data is None:
            report_progress(f"{name}: reading the features", 0, None)
            data = datasets[lab.column(target)] = load_feature_set(features, lab, target)
        trusted = loaded.check_features(data.features, data.ids, data.feature_dir, data.contract,
                                        trust_features=trust_features)
        report_progress(f"{name}: scoring {len(data.ids)} videos", 0, None)
        pred = predict_set(loaded.model, data, device=device)
        metrics = report(pred, data.targets)
        if explain:
            from aqa_cli.effects import explanation_report

            span = float(loaded.scale["score_max"]) - float(loaded.scale["score_min"])
            videos = len(data.features)
            report_progress(f"{name}: explanations", 0, videos)
            ex = explanation_report(loaded.model, data.features, span, device=device,
                                    on_video=lambda k: report_progress(f"{name}: explanations", k, videos))
            metrics.update({k: ex[k] for k in ("faithfulness", "faithfulness_median", "deletion_area")})
        metrics.update(interval_report(loaded, data, pred, level))
        results.append(Evaluation(weights=Path(w), target=data.target_name, head=loaded.head,
                                  metrics=metrics,
                                  predictions={vid: float(p) for vid, p in zip(data.ids, np.round(pred, 4))},
                                  notes=[*data.notes, *([trusted] if trusted else [])]))
    overall = fisher_z_mean([r.metrics["spearman"] for r in results]) if len(results) > 1 else None
    return results, overall


def interval_report(loaded: Any, data: FeatureSet, pred: np.ndarray, level: float = 0.9) -> dict[str, Any]:
    """Coverage and mean width of the head's intervals on labelled videos, its CV figures, and its domain flags."""
    from aqa_cli.calibration import read_calibration, read_domain

    out: dict[str, Any] = {}
    calibration = read_calibration(loaded.metadata)
    if calibration is None:
        out["interval"] = None
        out["interval_missing"] = "the head file holds no calibration data (train it with --folds K)"
    else:
        scale = {"min": loaded.scale["score_min"], "max": loaded.scale["score_max"]}
        intervals = [calibration.interval(float(p), level, scale) for p in pred]
        inside = [i["low"] <= y <= i["high"] for i, y in zip(intervals, data.targets)]
        out["interval"] = {"level": level, "coverage": float(np.mean(inside)),
                           "mean_width": float(np.mean([i["high"] - i["low"] for i in intervals])),
                           "half_width": intervals[0]["half_width"], "method": calibration.method, "n": len(inside),
                           "cv": calibration.cv_coverage(level)}
    domain = read_domain(loaded.path, loaded.metadata)
    if domain is not None:
        flags = [not domain.check(f)["in_domain"] for f in data.features]
        out["domain"] = {"flagged": int(np.sum(flags)), "flag_rate": float(np.mean(flags)), "alpha": domain.alpha}
    return out
