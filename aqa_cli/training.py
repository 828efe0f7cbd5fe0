"""Training and cross-validation of scoring heads on clip features.

Training follows the long-term AQA protocol: each epoch takes one random crop
of ``crop`` consecutive clips per video (shorter videos are padded and
masked), batches them, and steps an SGD/AdamW optimiser under a cosine
schedule; evaluation runs on the full sequences. There is no early stopping
and no epoch picking on held-out data: a run trains for its fixed number of
epochs and the last weights are the model. Settings are compared by K-fold
cross-validation inside the training data.

Everything random (initialisation, dropout, crops, shuffling, folds) flows
from one seed, so the same seed, data and settings give the same model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aqa_cli.dataset import FeatureSet
from aqa_cli.errors import AqaError
from aqa_cli.heads import Head, HeadConfig, create_head, dataclass_from_dict, head_class
from aqa_cli.metrics import report, spearman


@dataclass
class TrainSettings:
    epochs: int = 200
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd, adam or adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (to lr × lr_min_factor) or constant
    lr_min_factor: float = 0.01
    crop: int = 124  # consecutive clips per training crop; 0 = whole sequences
    # > 0: each batch's crop length is drawn from [crop_min, crop] (test videos run longer than the crop: Fis-V
    # trains on 124 clips and tests on up to 302).
    crop_min: int = 0
    # > 0: the model is the exponential moving average of the weights (and BatchNorm statistics), this decay
    # per optimiser step; the weights a run ends with are then smoothed over its last ~1/(1 − ema) steps.
    ema: float = 0.0
    # Seeds trained per model and shipped as one ensemble (HeadEnsemble): fold models of a cross-validation
    # are such ensembles too, so its figures describe what ships.
    members: int = 1
    eval_every: int = 10  # epochs between held-out evaluations during cross-validation (logged, never used to pick)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        return dataclass_from_dict(cls, values, "training settings")


# One callback for progress: (fold or None, epoch (1-based), the epoch's log record plus "of", the epochs in all).
EpochCallback = Callable[[int | None, int, dict[str, float]], None]


@dataclass
class FitResult:
    head: Head
    history: list[dict[str, float]]
    seconds: float


@dataclass
class CVResult:
    folds: int
    fold_rhos: list[float]
    fold_sizes: list[int]
    oof_predictions: np.ndarray  # every video's prediction by the fold model that did not see it
    heads: list[Head]
    histories: list[list[dict[str, float]]]
    seconds: float
    assignment: np.ndarray  # fold index per video (repeat 0)
    oof_report: dict[str, float] = field(default_factory=dict)
    repeats: int = 1
    repeat_oof_rhos: list[float] = field(default_factory=list)  # each repeat's out-of-fold ρ
    # Each repeat's out-of-fold predictions (repeat 0's are oof_predictions): what a blend of two runs on the same
    # folds needs, without refitting either (their logs' cv_oof_repeats).
    repeat_oof: list[np.ndarray] = field(default_factory=list)
    # Faithfulness (mean over held-out videos of ρ(D^, D)) and deletion area of the fold models' explanations.
    explanation: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_rho(self) -> float:
        return float(np.mean(self.fold_rhos))

    @property
    def std_rho(self) -> float:
        return float(np.std(self.fold_rhos, ddof=1)) if len(self.fold_rhos) > 1 else 0.0

    @property
    def se_rho(self) -> float:
        """Standard error of the mean fold ρ over all repeats × folds (folds share videos, so it is a floor)."""
        return self.std_rho / math.sqrt(len(self.fold_rhos)) if len(self.fold_rhos) > 1 else 0.0

    def summary(self) -> dict[str, Any]:
        out = {"folds": self.folds, "fold_spearman": self.fold_rhos, "fold_sizes": self.fold_sizes,
               "mean_spearman": self.mean_rho, "std_spearman": self.std_rho, "oof": self.oof_report,
               "seconds": self.seconds}
        if self.repeats > 1:
            out.update(repeats=self.repeats, se_spearman=self.se_rho, repeat_oof_spearman=self.repeat_oof_rhos)
        if self.explanation:
            out["explanation"] = self.explanation
        return out


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _batch(features: list[np.ndarray], crop: int, rng: np.random.Generator | None,
           crop_min: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop (random start when ``rng`` is given; a random length in [crop_min, crop] with ``crop_min``) or pad
    to a common length, with the real-clip mask."""
    if crop and crop_min and rng is not None:
        crop = int(rng.integers(min(crop_min, crop), crop + 1))
    pieces = []
    for f in features:
        if crop and len(f) > crop:
            start = int(rng.integers(0, len(f) - crop + 1)) if rng is not None else (len(f) - crop) // 2
            f = f[start:start + crop]
        pieces.append(f)
    length = max(len(p) for p in pieces)
    x = np.zeros((len(pieces), length, pieces[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(pieces), length), dtype=bool)
    for i, p in enumerate(pieces):
        x[i, :len(p)] = p
        mask[i, :len(p)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


@torch.inference_mode()
def predict(model: torch.nn.Module, features: list[np.ndarray], *, device: torch.device | str = "cpu",
            batch_size: int = 8, labels: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """Scores of full sequences, batched by similar length (padding is masked, so batching does not
    change a score). ``labels`` (one row per video) reach a head whose forward pass reads them."""
    model.eval()
    order = np.argsort([len(f) for f in features], kind="stable")
    out = np.empty(len(features), dtype=np.float64)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x, mask = _batch([features[j] for j in idx], 0, None)
        if labels is not None and getattr(model, "forward_reads_labels", False):
            rows = torch.as_tensor(idx)
            res = model(x.to(device), mask.to(device), labels={k: v[rows].to(device) for k, v in labels.items()})
        else:
            res = model(x.to(device), mask.to(device))
        out[idx] = res.score.double().cpu().numpy()
    return out


def predict_set(model: torch.nn.Module, data: FeatureSet, *, device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`predict` on a labelled set, with what the head reads from the labels (``Head.inference_labels``:
    the pose head's dive types) and its label rule applied (``Head.apply_labels``: the pose head's execution
    score × difficulty); the scores to compare with ``data.targets``."""
    read = getattr(model, "inference_labels", None)
    pred = predict(model, data.features, device=device, labels=read(data) if read is not None else None)
    rule = getattr(model, "apply_labels", None)
    return rule(pred, data) if rule is not None else pred


def _optimizer(params, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise AqaError(f"unknown optimizer {s.optimizer!r}", fix="use sgd, adam or adamw")


def _lr_at(epoch: int, s: TrainSettings) -> float:
    if s.schedule == "constant":
        return s.lr
    if s.schedule != "cosine":
        raise AqaError(f"unknown schedule {s.schedule!r}", fix="use cosine or constant")
    lo = s.lr * s.lr_min_factor
    return lo + 0.5 * (s.lr - lo) * (1 + math.cos(math.pi * epoch / max(s.epochs, 1)))


MEMBER_SEED_STRIDE = 7919  # member j of a model is trained with seed + j × this (j = 0: the model's own seed)


def fit_model(head_name: str, config: HeadConfig | dict, data: FeatureSet, settings: TrainSettings, *,
              seed: int = 0, device: str | torch.device = "cpu", val: FeatureSet | None = None,
              fold: int | None = None, on_epoch: EpochCallback | None = None) -> tuple[list[Head], FitResult]:
    """``settings.members`` heads from seeds seed, seed + 7919, …: the members of one model (with the first
    member's FitResult, its time covering them all)."""
    members, first = [], None
    start = time.perf_counter()
    for j in range(max(1, settings.members)):
        res = fit(head_name, config, data, settings, seed=seed + j * MEMBER_SEED_STRIDE, device=device,
                  val=val if j == 0 else None, fold=fold, on_epoch=on_epoch)
        members.append(res.head)
        first = first or res
    first.seconds = time.perf_counter() - start
    return members, first


def as_model(members: list[Head]) -> torch.nn.Module:
    """One head as itself, several as their ensemble."""
    return members[0] if len(members) == 1 else _ensemble(members)


def fit(head_name: str, config: HeadConfig | dict, data: FeatureSet, settings: TrainSettings, *, seed: int = 0,
        device: str | torch.device = "cpu", val: FeatureSet | None = None, fold: int | None = None,
        on_epoch: EpochCallback | None = None) -> FitResult:
    """Train a fresh head on ``data`` for exactly ``settings.epochs`` epochs."""
    device = torch.device(device)
    set_seed(seed)
    cls = head_class(head_name)
    if isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    # Heads that learn from more label columns than the target complete their config from the data (the mtl
    # head's caption vocabulary) and check those labels before any training step.
    config = cls.prepare_config(config, data)
    head = create_head(head_name, config).to(device)
    if data.feature_dim != head.config.in_dim:
        raise AqaError(f"features are {data.feature_dim}-d but the {head_name} head is configured for "
                       f"{head.config.in_dim}-d", path=data.feature_dir, fix="set the head's in_dim to match")
    aux = head.encode_labels(data)  # None for heads that learn from the score alone
    if aux is not None:
        aux = {k: v.to(device) for k, v in aux.items()}
    rng = np.random.default_rng(seed)
    opt = _optimizer(head.parameters(), settings)
    averaged = None
    if settings.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(head, multi_avg_fn=get_ema_multi_avg_fn(settings.ema), use_buffers=True)
    targets = torch.as_tensor(data.targets, dtype=torch.float32)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(settings.epochs):
        for group in opt.param_groups:
            group["lr"] = _lr_at(epoch, settings)
        head.train()
        order = rng.permutation(len(data))
        sums: dict[str, float] = {}
        seen = 0
        for i in range(0, len(order), settings.batch_size):
            idx = order[i:i + settings.batch_size]
            if len(idx) < 2 and len(order) > 1:
                continue  # BatchNorm needs two samples; a lone leftover video is seen again next epoch
            x, mask = _batch([data.features[j] for j in idx], settings.crop, rng, settings.crop_min)
            if aux is None:
                out = head(x.to(device), mask.to(device))
                loss, parts = head.loss(out, targets[idx].to(device))
            else:
                rows = torch.as_tensor(idx, device=device)
                batch = {k: v[rows] for k, v in aux.items()}
                out = (head(x.to(device), mask.to(device), labels=batch) if head.forward_reads_labels
                       else head(x.to(device), mask.to(device)))
                loss, parts = head.loss(out, targets[idx].to(device), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if averaged is not None:
                averaged.update_parameters(head)
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            seen += len(idx)
        record = {k: v / max(seen, 1) for k, v in sums.items()}
        record["epoch"] = epoch + 1
        record["lr"] = _lr_at(epoch, settings)
        last = epoch + 1 == settings.epochs
        if val is not None and (last or (settings.eval_every and (epoch + 1) % settings.eval_every == 0)):
            model = averaged.module if averaged is not None else head
            record["val_spearman"] = spearman(predict_set(model, val, device=device), val.targets)
        history.append(record)
        if on_epoch is not None:
            on_epoch(fold, epoch + 1, {**record, "of": settings.epochs})
    if averaged is not None:
        head.load_state_dict(averaged.module.state_dict())
    head.eval()
    # A part fitted in closed form (the additive head's linear probe) comes last, on the same training videos;
    # it draws no random numbers, so the trained part is the same with it or without.
    fit_closed_form = getattr(head, "fit_closed_form", None)
    if fit_closed_form is not None:
        fit_closed_form(data)
    return FitResult(head=head, history=history, seconds=time.perf_counter() - start)


def fold_assignment(targets: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Folds stratified by score: videos sorted by target (ties broken at random) are dealt out in turn,
    so every fold spans the whole range and fold estimates vary less."""
    n = len(targets)
    if folds < 2 or folds > n:
        raise AqaError(f"--folds {folds} does not fit {n} videos", fix="use 2 ≤ folds ≤ number of videos")
    rng = np.random.default_rng(seed)
    jitter = rng.permutation(n)
    order = np.lexsort((jitter, targets))
    assign = np.empty(n, dtype=np.int64)
    for block in range(0, n, folds):
        members = order[block:block + folds]
        assign[members] = rng.permutation(folds)[:len(members)]
    return assign


REPEAT_SEED_STRIDE = 1009  # repeat r of a cross-validation draws its folds (and fold seeds) from seed + r × this


def cross_validate(head_name: str, config: HeadConfig | dict, data: FeatureSet, settings: TrainSettings, *,
                   folds: int = 5, seed: int = 0, device: str | torch.device = "cpu", repeats: int = 1,
                   explain: bool = True, on_epoch: EpochCallback | None = None) -> CVResult:
    """K-fold cross-validation inside ``data``, repeated ``repeats`` times over fresh fold draws.

    Repeat r draws its folds with seed s_r = seed + 1009·r and trains fold k's model with s_r + k, so repeat 0
    is the plain K-fold run. ``explain`` also measures each fold model's explanations on its held-out videos
    (:func:`aqa_cli.effects.explanation_report`). The out-of-fold predictions and the models are repeat 0's."""
    from aqa_cli.effects import explanation_report

    if isinstance(config, dict):
        config = config_for(head_name, config)
    start = time.perf_counter()
    rhos, sizes, heads, histories, repeat_rhos, explained = [], [], [], [], [], []
    oof = np.empty(len(data), dtype=np.float64)
    repeat_oof: list[np.ndarray] = []
    assign0 = None
    for r in range(max(1, repeats)):
        s_r = seed + r * REPEAT_SEED_STRIDE
        assign = fold_assignment(data.targets, folds, s_r)
        oof_r = np.empty(len(data), dtype=np.float64)
        for k in range(folds):
            train_idx = np.flatnonzero(assign != k)
            val_idx = np.flatnonzero(assign == k)
            val = data.subset(val_idx)
            members, res = fit_model(head_name, config, data.subset(train_idx), settings, seed=s_r + k,
                                     device=device, val=val, fold=k, on_epoch=on_epoch)
            model = as_model(members)
            pred = predict_set(model, val, device=device)
            oof_r[val_idx] = pred
            rhos.append(spearman(pred, val.targets))
            sizes.append(len(val_idx))
            if explain:
                explained.append(explanation_report(model, val.features, config.score_span, device=device))
            if r == 0:
                heads.extend(members)  # flat: `--final folds` ships every fold's members as one ensemble
                histories.append(res.history)
        repeat_rhos.append(spearman(oof_r, data.targets))
        repeat_oof.append(oof_r)
        if r == 0:
            oof, assign0 = oof_r, assign
    result = CVResult(folds=folds, fold_rhos=rhos, fold_sizes=sizes, oof_predictions=oof, heads=heads,
                      histories=histories, seconds=time.perf_counter() - start, assignment=assign0,
                      repeats=max(1, repeats), repeat_oof_rhos=repeat_rhos, repeat_oof=repeat_oof)
    result.oof_report = report(oof, data.targets)
    if explained:
        weights = np.array([e["n"] for e in explained], dtype=np.float64)
        result.explanation = {
            key: float(np.average([e[key] for e in explained], weights=weights))
            for key in ("faithfulness", "deletion_area")}
        result.explanation["fold_faithfulness"] = [e["faithfulness"] for e in explained]
    return result


def config_for(head_name: str, values: dict[str, Any]) -> HeadConfig:
    return head_class(head_name).config_class.from_dict(values)


@dataclass
class TrainJob:
    """Everything ``aqa train`` does, callable from Python: CV (optional), the final model, the files."""

    features: str
    labels: str
    target: str
    head: str
    out: str
    preset: str | None = None
    epochs: int | None = None
    seed: int = 0
    folds: int = 0
    repeats: int = 1  # repeated K-fold: the cross-validation is run this many times over fresh fold draws
    final: str = "all"  # "all": one model trained on every video; "folds": the fold models as an ensemble
    device: str = "cpu"
    half: bool = False  # store float16 tensors (half the size; scores change by < 1e-3 points)
    overrides: dict[str, Any] = field(default_factory=dict)  # train/model settings over the preset's
    # The training log of an earlier run of this very job with --folds K: its cross-validation is taken over
    # instead of recomputed (training is deterministic, so recomputing would give the same figures).
    cv_from: str | None = None


def run_train_job(job: TrainJob, *, on_epoch: EpochCallback | None = None,
                  on_stage: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Train, cross-validate and save; returns the training log (also written beside the checkpoint)."""
    from pathlib import Path

    from aqa_cli.dataset import load_feature_set
    from aqa_cli.fileio import write_json
    from aqa_cli.heads.checkpoint import save_head
    from aqa_cli.presets import load_preset

    head_class(job.head)  # an unknown head fails before any data is read
    if job.final not in ("all", "folds"):
        raise AqaError(f"unknown --final {job.final!r}", fix="use all or folds")
    if job.final == "folds" and job.folds < 2:
        raise AqaError("--final folds ships the cross-validation models", fix="add --folds K (K ≥ 2)")
    preset = load_preset(job.preset) if job.preset else None
    if preset is not None and preset.combine:
        raise AqaError(f"preset {preset.name} sums the scores of {' and '.join(preset.combine)}; it has no head of "
                       "its own", fix=f"train each part: --preset {' / --preset '.join(preset.combine)}")
    data = load_feature_set(job.features, job.labels, job.target,
                            expected_dim=preset.feature_dim if preset else None)
    train_values = preset.train_settings(job.head) if preset else {}
    model_values = preset.model_settings(job.head) if preset else {
        "in_dim": data.feature_dim, "score_min": float(min(data.targets.min(), 0.0)),
        "score_max": float(data.targets.max() * 1.1)}
    if preset:
        train_values.setdefault("crop", preset.train_clips)
    for key, value in job.overrides.items():
        (train_values if key in {f.name for f in dataclasses.fields(TrainSettings)} else model_values)[key] = value
    if job.epochs is not None:
        train_values["epochs"] = job.epochs
    settings = TrainSettings.from_dict(train_values)
    # Completed once from every video (e.g. the mtl head's vocabulary), so fold models share it and can ship
    # as one ensemble; a label problem is reported here, before any training.
    config = head_class(job.head).prepare_config(config_for(job.head, model_values), data)
    label_columns = head_class(job.head).label_columns(config)
    log: dict[str, Any] = {
        "head": job.head, "preset": job.preset, "target": data.target_name, "seed": job.seed,
        "features": str(job.features), "labels": str(job.labels), "n_videos": len(data),
        "data_sha256": data.fingerprint(label_columns), "train_settings": dataclasses.asdict(settings),
        "config": json.loads(config.to_json()), "notes": data.notes, "torch_threads": torch.get_num_threads(),
    }
    cv = None
    stages = (job.folds if job.folds >= 2 else 0) + (1 if job.final == "all" else 0)
    if job.cv_from:
        if job.final != "all":
            raise AqaError("--cv-from reuses the figures of a cross-validation, not its models",
                           fix="use it with --final all, or drop it to train the fold models again")
        log.update(reused_cv(job.cv_from, log, job.folds, job.repeats))
    elif job.folds >= 2:
        if on_stage:
            on_stage("cross-validation", 0, stages)
        cv = cross_validate(job.head, config, data, settings, folds=job.folds, seed=job.seed, device=job.device,
                            repeats=job.repeats, on_epoch=on_epoch)
        log["cv"] = cv.summary()
        log["cv_histories"] = cv.histories
        # Out-of-fold predictions by video, so runs sharing the folds (same seed and data) can be compared and
        # combined without retraining.
        log["cv_oof"] = {vid: float(p) for vid, p in zip(data.ids, cv.oof_predictions)}
        if cv.repeats > 1:
            log["cv_oof_repeats"] = [{vid: float(p) for vid, p in zip(data.ids, oof_r)} for oof_r in cv.repeat_oof]
    if job.final == "all":
        if on_stage:
            on_stage("final model on all videos", stages - 1, stages)
        members, res = fit_model(job.head, config, data, settings, seed=job.seed, device=job.device,
                                 on_epoch=on_epoch)
        seconds, history = res.seconds, res.history
        log["history"] = history
    else:
        members, seconds = cv.heads, cv.seconds
    train_pred = predict_set(as_model(members), data, device=job.device)
    log["train_fit"] = report(train_pred, data.targets)  # in-sample: a sanity check, not an estimate
    log["train_seconds"] = seconds
    log["total_seconds"] = seconds + (log["cv"]["seconds"] if "cv" in log and job.final == "all" else 0.0)
    made_by = data.contract.get("backbone", {})
    # The weights too: a head reads only features of the weights it was trained on (LoadedHead.check_weights).
    contract = {"backbone": (preset.backbone if preset else made_by.get("name")),
                "feature_dim": data.feature_dim, "recipe": data.contract.get("recipe", {}).get("name"),
                "weights": made_by.get("weights"), "weights_sha256": made_by.get("weights_sha256")}
    scale = {"score_min": config.score_min, "score_max": config.score_max,
             "unit": preset.unit if preset else "points"}
    metadata = {"preset": job.preset or "", "description": preset.description if preset else "",
                "target": data.target_name, "scale": scale, "contract": contract,
                "data_sha256": log["data_sha256"], "n_videos": str(len(data)), "seed": str(job.seed),
                "epochs": str(settings.epochs), "train_settings": log["train_settings"], "final": job.final,
                "cv": log.get("cv", {}), "train_seconds": f"{log['total_seconds']:.1f}"}
    out = Path(job.out)
    save_head(out, members, metadata, half=job.half)
    log.update(calibrate_head_file(out, data, log, preset.dataset if preset else "", seed=job.seed))
    log["checkpoint"] = str(out)
    write_json(out.with_suffix(".log.json"), log)
    return log


# Fewer training videos than this fit no domain model: its held-out p-values could not reach DOMAIN_ALPHA.
DOMAIN_MIN_VIDEOS = 100


def calibrate_head_file(path: str | Path, data: FeatureSet, log: dict[str, Any], dataset: str = "", *,
                        seed: int = 0) -> dict[str, Any]:
    """Store in a saved head file what its intervals and domain check need (:mod:`aqa_cli.calibration`): the
    out-of-fold predictions of the log's cross-validation, and a model of the training videos' features with
    held-out distances. Returns the log entries: the interval's coverage and width measured by CV, and what was
    not stored and why."""
    from aqa_cli.calibration import Calibration, DomainModel, store_in_head, video_descriptor

    entries: dict[str, Any] = {}
    label = f"the {len(data)} {dataset + ' ' if dataset else ''}training videos"
    calibration = None
    if log.get("cv_oof"):
        calibration = Calibration.from_log(log, dict(zip(data.ids, map(float, data.targets))), dataset=label)
        entries["calibration_cv"] = calibration.cv_coverage()
    else:
        entries["calibration_missing"] = "no cross-validation (train with --folds K): no interval can be calibrated"
    domain = None
    if len(data) >= DOMAIN_MIN_VIDEOS:
        descriptors = np.stack([video_descriptor(f) for f in data.features])
        domain = DomainModel.fit_calibrated(descriptors, seed=seed, label=label)
        entries["domain"] = domain.info()
    else:
        entries["domain_missing"] = (f"{len(data)} training videos, under {DOMAIN_MIN_VIDEOS}: too few to calibrate "
                                     "a domain check")
    store_in_head(path, calibration, domain)
    return entries


def reused_cv(path: str, log: dict[str, Any], folds: int, repeats: int = 1) -> dict[str, Any]:
    """The cross-validation entries of an earlier log, after checking it ran this very job: same head,
    target, data (sha256), seed, settings, config and fold count. Anything else is refused by name."""
    from pathlib import Path

    try:
        earlier = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AqaError(f"cannot read the training log ({exc})", path=path,
                       fix="give the .log.json written beside an `aqa train --folds K` checkpoint") from None
    if "cv" not in earlier:
        raise AqaError("this training log has no cross-validation", path=path, fix="give a log of a --folds K run")
    keys = ("head", "target", "data_sha256", "seed")
    differ = [k for k in keys if earlier.get(k) != log[k]]
    # Training settings added after the earlier run count as equal when they hold their defaults.
    settings_then = {**dataclasses.asdict(TrainSettings()), **earlier.get("train_settings", {})}
    if settings_then != log["train_settings"]:
        differ.append("train_settings")
    # A setting added to the head after the earlier run counts as equal when it holds its default, which is
    # what that run had.
    defaults = json.loads(head_class(log["head"]).config_class().to_json()) if earlier.get("head") == log["head"] else {}
    then = {**{k: v for k, v in defaults.items() if k not in earlier.get("config", {})}, **earlier.get("config", {})}
    differ += [f"config.{k}" for k in sorted(set(then) | set(log["config"])) if then.get(k) != log["config"].get(k)]
    if earlier["cv"].get("folds") != folds:
        differ.append(f"folds ({earlier['cv'].get('folds')} there, {folds} here)")
    if earlier["cv"].get("repeats", 1) != repeats:
        differ.append(f"repeats ({earlier['cv'].get('repeats', 1)} there, {repeats} here)")
    if differ:
        raise AqaError(f"the earlier run differs from this one in {', '.join(differ)}", path=path,
                       fix="repeat its settings exactly, or drop --cv-from to cross-validate again")
    taken = {k: earlier[k] for k in ("cv", "cv_histories", "cv_oof", "cv_oof_repeats") if k in earlier}
    taken["cv_reused_from"] = Path(path).name
    return taken


def _ensemble(members: list[Head]) -> torch.nn.Module:
    from aqa_cli.heads.checkpoint import HeadEnsemble

    return HeadEnsemble(members)
