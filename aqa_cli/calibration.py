"""How far to trust a score: a conformal interval, the rank among the training programs, and a domain check.

**Intervals** are split-conformal. Cross-validation already scores every training video with a model that never
saw it (the out-of-fold predictions of the training log, ``cv_oof`` and ``cv_oof_repeats``); their absolute
residuals |prediction − label| are the conformity scores. For level 1 − α the half-width is the finite-sample
quantile of those scores at ⌈(n + 1)(1 − α)⌉ / n (n videos; with R repeats each video's R residuals weigh 1/R),
so a new video from the same population lands inside ``score ± half-width`` with probability ≥ 1 − α. The
shipped fold ensemble is at least as accurate as one fold model, so the out-of-fold residuals are, if anything,
wide. A head file stores the residuals by video (:data:`CALIBRATION_KEY`), so any level can be asked for and
two heads' residuals pair up into the interval of their sum (TES + PCS).

A normalised score |residual| / (spread + c) was measured against this (``bench/conformal_cv.py``) with the only
out-of-fold spread training can give honestly, that of the repeats' out-of-fold predictions: it did not narrow
the interval, so the plain residual interval ships (``method`` says which).

**The domain check** models what the head's training videos look like: each video is described by the mean and
the standard deviation over its clips of every feature channel, standardised by the training videos' statistics,
and scored by its distance from them in a PCA space (Hotelling's T² on the leading components plus the
reconstruction error of the rest). The distance alone means little; it is turned into a conformal p-value
against the distances of *held-out* training videos (each scored by a model fitted without its fold), so that
about :data:`DOMAIN_ALPHA` of real in-domain videos are flagged, by construction.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aqa_cli.errors import AqaError

CALIBRATION_KEY = "calibration"  # head metadata: the JSON of :class:`Calibration`
DOMAIN_PREFIX = "domain."  # head tensors of the domain model (the head's own tensors are ``members.<k>.``)
DEFAULT_LEVEL = 0.9
DOMAIN_ALPHA = 0.01  # a video is flagged out of domain below this p-value
DOMAIN_COMPONENTS = 16
RESIDUAL_METHOD = "split-conformal (out-of-fold residuals)"


# ------------------------------------------------------------------------------------------------ intervals


def conformal_quantile(scores: np.ndarray, level: float, n: int | None = None,
                       weights: np.ndarray | None = None) -> float:
    """The finite-sample split-conformal quantile: the smallest score s with weighted CDF(s) ≥ ⌈(n+1)·level⌉/n.

    ``n`` is the number of exchangeable units (videos; default len(scores)); ``weights`` spread each unit over
    several scores (repeats). Infinite when the level needs more units than there are (n too small)."""
    if not 0.0 < level < 1.0:
        raise AqaError(f"level {level:g} is not between 0 and 1", fix="use e.g. --level 0.9")
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores) if n is None else n
    rank = math.ceil((n + 1) * level)
    if rank > n or n == 0:
        return math.inf
    w = np.full(len(scores), 1.0 / len(scores)) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    order = np.argsort(scores, kind="stable")
    cdf = np.cumsum(w[order])
    return float(scores[order][min(int(np.searchsorted(cdf, rank / n - 1e-12)), len(scores) - 1)])


@dataclass
class Calibration:
    """What an interval and a rank need: every training video's label and out-of-fold predictions."""

    ids: list[str]
    targets: np.ndarray  # [n] the training labels
    oof: np.ndarray  # [R, n] out-of-fold predictions, one row per CV repeat
    target: str = ""
    dataset: str = ""  # "the 400 Fis-V training programs" reads better than ids
    method: str = RESIDUAL_METHOD

    @property
    def n(self) -> int:
        return len(self.ids)

    def residuals(self) -> np.ndarray:
        return self.oof - self.targets[None, :]

    def half_width(self, level: float = DEFAULT_LEVEL) -> float:
        # Every repeat's residual counts as a calibration score (n = videos x repeats): the repeats draw other
        # folds, so each is another out-of-fold look at the video. Coverage is measured, not assumed (cv_coverage).
        scores = np.abs(self.residuals()).ravel()
        return conformal_quantile(scores, level, n=len(scores))

    def interval(self, score: float, level: float = DEFAULT_LEVEL, scale: dict[str, Any] | None = None) -> dict:
        """{low, high, level, method, half_width}; clipped to the scale (a true score lies on it)."""
        hw = self.half_width(level)
        low, high = score - hw, score + hw
        if scale:
            low = max(low, float(scale.get("min", low)))
            high = min(high, float(scale.get("max", high)))
        return {"low": low, "high": high, "level": level, "method": self.method, "half_width": hw,
                "calibrated_on": self.n}

    def rank(self, score: float) -> dict[str, Any]:
        """The share of training programs scored (by their judges) below ``score``."""
        below = float(np.mean(self.targets < score))
        return {"below": below, "of": self.n, "dataset": self.dataset}

    def cv_coverage(self, level: float = DEFAULT_LEVEL, *, folds: int = 5, repeats: int = 20,
                    seed: int = 0) -> dict[str, float]:
        """Coverage and mean width measured, not assumed: the videos split ``folds`` ways ``repeats`` times; the
        half-width from all other folds' residuals, coverage on the held-out fold's (each repeat's residual)."""
        rng = np.random.default_rng(seed)
        res = np.abs(self.residuals())
        covered, widths = [], []
        for _ in range(repeats):
            assign = rng.permutation(self.n) % folds
            for k in range(folds):
                cal, held = assign != k, assign == k
                hw = conformal_quantile(res[:, cal].ravel(), level, n=int(res[:, cal].size))
                covered.append(float(np.mean(res[:, held] <= hw)))
                widths.append(2 * hw)
        return {"level": level, "coverage": float(np.mean(covered)), "coverage_sd": float(np.std(covered)),
                "mean_width": float(np.mean(widths)), "folds": folds, "repeats": repeats, "n": self.n}

    def to_json(self) -> str:
        return json.dumps({"format": "aqa-calibration/1", "method": self.method, "target": self.target,
                           "dataset": self.dataset, "ids": self.ids,
                           "targets": [round(float(v), 4) for v in self.targets],
                           "oof": [[round(float(v), 4) for v in row] for row in self.oof]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        return cls(ids=list(d["ids"]), targets=np.asarray(d["targets"], np.float64),
                   oof=np.asarray(d["oof"], np.float64).reshape(-1, len(d["ids"])), target=d.get("target", ""),
                   dataset=d.get("dataset", ""), method=d.get("method", RESIDUAL_METHOD))

    @classmethod
    def from_log(cls, log: dict[str, Any], labels: dict[str, float], dataset: str = "") -> Calibration:
        """From a training log's out-of-fold predictions (every repeat's) and the labels by video id."""
        rows = log.get("cv_oof_repeats") or ([log["cv_oof"]] if log.get("cv_oof") else [])
        if not rows:
            raise AqaError("the training log holds no out-of-fold predictions",
                           fix="train with --folds K (K ≥ 2): the cross-validation is what calibrates the interval")
        ids = [i for i in rows[0] if i in labels]
        return cls(ids=ids, targets=np.array([labels[i] for i in ids]),
                   oof=np.array([[row[i] for i in ids] for row in rows]), target=log.get("target", ""),
                   dataset=dataset)

    def combined(self, other: Calibration, target: str = "total") -> Calibration:
        """The calibration of the sum of two heads' scores (TES + PCS): their joint out-of-fold residuals, on the
        videos and repeats both have."""
        common = [i for i in self.ids if i in set(other.ids)]
        a = {i: k for k, i in enumerate(self.ids)}
        b = {i: k for k, i in enumerate(other.ids)}
        reps = min(len(self.oof), len(other.oof))
        ia, ib = [a[i] for i in common], [b[i] for i in common]
        return Calibration(ids=common, targets=self.targets[ia] + other.targets[ib],
                           oof=self.oof[:reps, ia] + other.oof[:reps, ib], target=target, dataset=self.dataset)


def shown_digits(half_width: float) -> int:
    """Decimals worth showing for a score known to ± ``half_width``: whole points once it is ±1 or wider."""
    if not math.isfinite(half_width) or half_width >= 1.0:
        return 0
    return 1 if half_width >= 0.1 else 2


# ------------------------------------------------------------------------------------------------ domain


def video_descriptor(features: np.ndarray) -> np.ndarray:
    """A video's clips [T, D] as one vector [2D]: each channel's mean and standard deviation over the clips."""
    f = np.asarray(features, dtype=np.float64)
    return np.concatenate([f.mean(0), f.std(0)])


@dataclass
class DomainModel:
    """Distance of a video from the training videos, and its conformal p-value against held-out ones."""

    mean: np.ndarray  # [2D]
    scale: np.ndarray  # [2D]
    components: np.ndarray  # [k, 2D]
    variances: np.ndarray  # [k]
    residual_mean: float
    held_out_scores: np.ndarray  # distances of training videos from a model fitted without their fold
    alpha: float = DOMAIN_ALPHA
    label: str = ""  # "the 400 Fis-V training programs"

    @classmethod
    def fit(cls, descriptors: np.ndarray, k: int = DOMAIN_COMPONENTS) -> DomainModel:
        x = np.asarray(descriptors, dtype=np.float64)
        mean = x.mean(0)
        sd = x.std(0)
        # A channel (nearly) constant over the training videos must not turn noise into a huge distance.
        scale = np.maximum(sd, 1e-3 * float(np.median(sd)) + 1e-12)
        z = (x - mean) / scale
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        k = max(1, min(k, len(x) - 2))
        comps = vt[:k]
        variances = np.maximum(s[:k] ** 2 / max(len(x) - 1, 1), 1e-12)
        resid = z - (z @ comps.T) @ comps
        residual_mean = float(np.mean(np.sum(resid ** 2, 1))) or 1.0
        return cls(mean, scale, comps, variances, residual_mean, np.zeros(0))

    def distance(self, descriptors: np.ndarray) -> np.ndarray:
        """T²/k + reconstruction error / its training mean: about 2 for a typical training video."""
        z = (np.atleast_2d(descriptors) - self.mean) / self.scale
        proj = z @ self.components.T
        t2 = np.sum(proj ** 2 / self.variances, 1) / len(self.variances)
        resid = np.sum((z - proj @ self.components) ** 2, 1) / self.residual_mean
        return t2 + resid

    def p_value(self, descriptor: np.ndarray) -> float:
        """(1 + #held-out distances ≥ this one) / (n + 1)."""
        d = float(self.distance(descriptor)[0])
        if not math.isfinite(d):
            return 0.0
        cal = self.held_out_scores
        return float((1 + np.sum(cal >= d)) / (len(cal) + 1))

    def check(self, features: np.ndarray) -> dict[str, Any]:
        p = self.p_value(video_descriptor(features))
        return {"p_value": p, "in_domain": p >= self.alpha, "alpha": self.alpha, "compared_with": self.label}

    @classmethod
    def fit_calibrated(cls, descriptors: np.ndarray, *, folds: int = 5, seed: int = 0, label: str = "",
                       k: int = DOMAIN_COMPONENTS) -> DomainModel:
        """The model of every video, with held-out distances from ``folds`` models each fitted without one fold."""
        x = np.asarray(descriptors, dtype=np.float64)
        assign = np.random.default_rng(seed).permutation(len(x)) % folds
        held = np.empty(len(x))
        for f in range(folds):
            held[assign == f] = cls.fit(x[assign != f], k).distance(x[assign == f])
        model = cls.fit(x, k)
        model.held_out_scores, model.label = held, label
        # A conformal p-value is never below 1/(n+1): with few calibration videos, flag what lies beyond every one
        # of them (an in-domain video does so with probability 1/(n+1)) rather than never flag anything.
        model.alpha = max(DOMAIN_ALPHA, 1.5 / (len(held) + 1))
        return model

    def tensors(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "components": self.components, "variances": self.variances,
                "held_out_scores": self.held_out_scores, "residual_mean": np.array([self.residual_mean])}

    def info(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "label": self.label, "components": int(len(self.variances)),
                "calibrated_on": int(len(self.held_out_scores)), "descriptor": "per-channel mean and sd over clips"}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], info: dict[str, Any]) -> DomainModel:
        return cls(t["mean"], t["scale"], t["components"], t["variances"], float(t["residual_mean"][0]),
                   t["held_out_scores"], alpha=float(info.get("alpha", DOMAIN_ALPHA)), label=info.get("label", ""))


# ------------------------------------------------------------------------------------------------ head files

_DTYPES = {"F64": np.float64, "F32": np.float32}


def read_domain(path: str | Path, metadata: dict[str, str]) -> DomainModel | None:
    """The head file's domain model, or None when it has none."""
    info = metadata.get("domain")
    if not info:
        return None
    from safetensors.numpy import load_file

    try:
        tensors = {k[len(DOMAIN_PREFIX):]: v.astype(np.float64) for k, v in load_file(str(path)).items()
                   if k.startswith(DOMAIN_PREFIX)}
        return DomainModel.from_tensors(tensors, json.loads(info))
    except (OSError, ValueError, KeyError):
        return None


def read_calibration(metadata: dict[str, str]) -> Calibration | None:
    text = metadata.get(CALIBRATION_KEY)
    if not text:
        return None
    try:
        return Calibration.from_json(text)
    except (ValueError, KeyError, TypeError):
        return None


def rewrite_head_file(path: str | Path, metadata: dict[str, str], extra_tensors: dict[str, np.ndarray]) -> None:
    """Rewrite a safetensors file's metadata (merged over the old) and add or replace ``extra_tensors``, copying
    every other tensor's bytes unchanged: a re-calibration never touches the trained weights. Atomic."""
    from aqa_cli.fileio import write_bytes

    path = Path(path)
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    data = raw[8 + size:]
    old_meta = header.pop("__metadata__", {}) or {}
    chunks, entries, offset = [], {}, 0
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if name in extra_tensors:
            continue
        start, end = entry["data_offsets"]
        chunks.append(data[start:end])
        entries[name] = {**entry, "data_offsets": [offset, offset + end - start]}
        offset += end - start
    for name, array in extra_tensors.items():
        blob = np.ascontiguousarray(array, dtype="<f8").tobytes()
        chunks.append(blob)
        entries[name] = {"dtype": "F64", "shape": list(np.shape(array)), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    head = {"__metadata__": {**old_meta, **{k: str(v) for k, v in metadata.items()}}, **entries}
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    write_bytes(path, struct.pack("<Q", len(text)) + text + b"".join(chunks))


def store_in_head(path: str | Path, calibration: Calibration | None, domain: DomainModel | None) -> None:
    """Put what intervals and the domain check need into a head file (metadata and ``domain.*`` tensors)."""
    meta: dict[str, str] = {}
    tensors: dict[str, np.ndarray] = {}
    if calibration is not None:
        meta[CALIBRATION_KEY] = calibration.to_json()
        meta["calibration_cv"] = json.dumps(calibration.cv_coverage())
    if domain is not None:
        meta["domain"] = json.dumps(domain.info())
        tensors = {DOMAIN_PREFIX + k: v for k, v in domain.tensors().items()}
    rewrite_head_file(path, meta, tensors)


def domain_flag_rate_cv(descriptors: np.ndarray, *, folds: int = 5, repeats: int = 4, seed: int = 0,
                        alpha: float = DOMAIN_ALPHA, k: int = DOMAIN_COMPONENTS) -> dict[str, float]:
    """The share of held-out in-domain videos flagged: each outer fold's videos against a calibrated model of the
    other folds (its own inner held-out calibration), ``repeats`` times."""
    x = np.asarray(descriptors, dtype=np.float64)
    rng = np.random.default_rng(seed)
    flagged = []
    for r in range(repeats):
        assign = rng.permutation(len(x)) % folds
        for f in range(folds):
            model = DomainModel.fit_calibrated(x[assign != f], seed=seed + r, k=k)
            model.alpha = alpha
            flagged.extend(model.p_value(d) < alpha for d in x[assign == f])
    return {"flag_rate": float(np.mean(flagged)), "videos": len(flagged), "alpha": alpha}
