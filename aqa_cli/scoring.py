"""``aqa score`` as a library: videos or feature files in, scores with their per-clip reasons out.

One :class:`Scorer` holds the chosen heads (:func:`choose_heads`) and gets each
input's clip features from the cheapest place that has them: a feature file and
its sidecar, the feature cache (:mod:`aqa_cli.cache`), or the backbone, which is
only built when a video misses the cache. Every head then turns the features into
a :class:`VideoScore`: the total on the target's scale and, per clip, its time
range, weight w_t and score s_t, with Σ w_t·s_t plus the head's additive terms
equal to the total. Whether w and s say what a clip does to the score is then
measured, not assumed: each clip's *effect* D_t is the score minus the same
head's score of the video without that clip (:mod:`aqa_cli.effects`), and the
video's *faithfulness* is the rank agreement between D and the effects that w
and s predict. Below :data:`FAITHFUL_RHO` the head's own weights are not shown
as the reason for the score; the effects are.

A head only reads features made the way its training features were (its
*contract*: backbone, feature size, recipe); anything else is refused with a
one-line error. One input that fails (not a video, truncated, too short, NaN
features…) becomes a failed :class:`VideoScore` and the batch goes on.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aqa_cli.backbones import (
    PRECISIONS, Backbone, create_backbone, get_backbone_spec, resolve_device, resolve_precision,
)
from aqa_cli.cache import FeatureCache, cache_key
from aqa_cli.effects import measured_effects
from aqa_cli.errors import AqaError, FeatureError, VideoError, WeightsError
from aqa_cli.extract import load_features, make_sidecar, read_sidecar, video_features
from aqa_cli.fileio import sha256_file
from aqa_cli.heads import HeadOutput, list_heads
from aqa_cli.heads.checkpoint import LoadedHead, load_head, shipped_dir
from aqa_cli.inputs import FEATURE_SUFFIX
from aqa_cli.metrics import faithfulness, predicted_effects
from aqa_cli.presets import Preset, list_presets, load_preset
from aqa_cli.validation import check_score_in_scale

# The skater's whole result (TES, PCS and their total, fisv.toml) is what a user of figure-skating videos wants
# from one run; its heads read the same Video Swin features, so the second head costs no second backbone pass.
DEFAULT_PRESET = "fisv"
# Faithfulness (Spearman ρ between the effects w·s predicts and the measured ones) from which a head's own
# weights and scores are presented as the reason for its score.
FAITHFUL_RHO = 0.5


# ------------------------------------------------------------------------------------------------ results


@dataclass
class ClipScore:
    index: int
    start_s: float
    end_s: float
    weight: float
    score: float
    # D_t = S − S(the video without this clip), measured; None for a one-clip video (nothing left to score).
    effect: float | None = None
    # D^_t = w_t·(s_t − Σ w·s) / (1 − w_t): what the head's own weight and score say removing the clip would do.
    predicted_effect: float | None = None
    # Source frames the clip covers (end exclusive), when known: the report decodes its middle frame.
    source_frame_start: int | None = None
    source_frame_end: int | None = None

    @property
    def contribution(self) -> float:
        return self.weight * self.score

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "start_s": self.start_s, "end_s": self.end_s, "weight": self.weight,
                "score": self.score, "effect": self.effect, "predicted_effect": self.predicted_effect}


@dataclass
class VideoScore:
    """One input scored by one head (or the failure to score it)."""

    input: Path
    status: str = "failed"  # "ok" or "failed"
    error: str | None = None
    kind: str = "video"  # "video" or "features"
    preset: str = ""
    head: str = ""  # the head family, e.g. "gdlt"
    head_path: Path | None = None
    backbone: str = ""
    score: float | None = None
    scale: dict[str, Any] = field(default_factory=dict)  # {min, max, unit}
    clips: list[ClipScore] = field(default_factory=list)
    additive: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    features_source: str = ""  # "backbone", "cache" or "file"
    video: Path | None = None  # the video file itself, when it can be read (for frames in the report)
    video_note: str | None = None  # why there is no video to show frames of, when the sidecar names one
    demonstration: str | None = None
    cv_spearman: float | None = None
    members: int = 1
    # Spearman ρ(predicted, measured effect) over the clips; None under three clips (no ranking to compare).
    faithfulness: float | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    target: str = ""  # the label the score predicts: "TES", "PCS", "total", "score"…
    # How far to trust the score (aqa_cli.calibration): {low, high, level, method, half_width, calibrated_on},
    # or None with the reason in interval_missing.
    interval: dict[str, Any] | None = None
    interval_missing: str | None = None
    rank: dict[str, Any] | None = None  # {below, of, dataset}: the share of training videos judged lower
    domain: dict[str, Any] | None = None  # {p_value, in_domain, alpha, compared_with}; None: the head has no model
    domain_missing: str | None = None  # why there is no domain check
    # Clip scores are a head's per-clip values before weighting: only Σ w·s (+ terms) is on the scale.
    clip_scale_note: str | None = None
    parts: list[VideoScore] = field(default_factory=list)  # a total's parts (fisv: the TES and PCS results)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def display_digits(self) -> int:
        """Decimals the interval supports (one without an interval, as before)."""
        from aqa_cli.calibration import shown_digits

        return shown_digits(self.interval["half_width"]) if self.interval else 1

    @property
    def explanation_faithful(self) -> bool:
        """Whether the head's own weights and scores say what its clips do (faithfulness ≥ FAITHFUL_RHO)."""
        return self.faithfulness is not None and self.faithfulness >= FAITHFUL_RHO

    @property
    def head_label(self) -> str:
        """The checkpoint's name (``fisv-pcs-gdlt``), else the head family."""
        return self.head_path.stem if self.head_path is not None else self.head

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object. Σ clips' weight·score + Σ additive == score."""
        # "head" names the checkpoint, as the CSV and the tables do, for ok and failed rows alike.
        d: dict[str, Any] = {"video": str(self.input), "status": self.status}
        if not self.ok:
            d.update(error=self.error, preset=self.preset or None, head=self.head_label or None,
                     head_family=self.head or None)
            return d
        d.update({
            "preset": self.preset or None,
            "head": self.head_label,
            "head_family": self.head,
            "weights": str(self.head_path) if self.head_path else None,
            "backbone": self.backbone,
            "score": self.score,
            "scale": dict(self.scale),
            "clips": [c.to_dict() for c in self.clips],
            "faithfulness": self.faithfulness,
            "explanation_faithful": self.explanation_faithful,
            "additive": dict(self.additive),
            "extras": dict(self.extras),
            "features_source": self.features_source,
            "demonstration": self.demonstration,
            "warnings": list(self.warnings),
            "target": self.target or None,
            "interval": dict(self.interval) if self.interval else None,
            "interval_missing": self.interval_missing,
            "rank": dict(self.rank) if self.rank else None,
            "domain": dict(self.domain) if self.domain else None,
            "domain_missing": self.domain_missing,
            "clip_scores_note": self.clip_scale_note,
        })
        return d


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class ClipFeatures:
    """An input's features for one backbone and recipe, with the clips' place in time."""

    features: np.ndarray  # float32 [T, D]
    clips: list[dict]  # per clip: start_s, end_s and, when known, source_frame_start/end
    backbone: str
    recipe: dict  # the full recipe (or {"name": ...} when only the name is known)
    source: str  # "backbone", "cache" or "file"
    video: Path | None
    warnings: list[str] = field(default_factory=list)
    weights: str | None = None  # the backbone weights' name (``file:<sha256>`` for a checkpoint given by path)
    weights_source: dict | None = None  # such a checkpoint's path and sha256
    video_note: str | None = None  # why ``video`` is None although the sidecar names one


# ------------------------------------------------------------------------------------------------ head choice


@dataclass
class HeadChoice:
    preset_name: str  # "" when a --weights checkpoint names no preset
    preset: Preset | None
    heads: list[LoadedHead]  # best first
    notes: list[str] = field(default_factory=list)
    # A preset that sums its parts (fisv): each video's results end with their total, target ``total``.
    total_target: str | None = None


def _try_preset(name: str) -> Preset | None:
    try:
        return load_preset(name)
    except AqaError:
        return None


def shipped_heads_for(preset: str, *, notes: list[str] | None = None) -> list[LoadedHead]:
    """The heads shipped for ``preset`` (``<preset>-<head>.safetensors``), best cross-validated ρ first.

    Heads without recorded cross-validation come after those with it; a damaged file is left
    out with a note.
    """
    folder = shipped_dir()
    found = []
    for head in list_heads():
        path = folder / f"{preset}-{head}.safetensors"
        if not path.is_file():
            continue
        try:
            found.append(load_head(path))
        except AqaError as exc:
            if notes is not None:
                notes.append(f"skipped {exc.message}")
    return sorted(found, key=lambda h: (h.cv_spearman is None, -(h.cv_spearman or 0.0), h.path.name))


def choose_heads(preset: str | None = None, head: str | None = None, weights: str | Path | None = None, *,
                 all_heads: bool = False) -> HeadChoice:
    """The head(s) to score with.

    ``weights`` names a checkpoint outright (its preset is taken from its metadata);
    otherwise the preset's shipped heads are searched in :func:`shipped_dir`: ``head``
    picks one by name, ``all_heads`` takes every one, and by default the one with the
    highest cross-validated ρ is used.
    """
    if weights is not None:
        if all_heads:
            raise AqaError("--all-heads compares the preset's shipped heads", fix="drop --weights, or drop --all-heads")
        loaded = load_head(weights)
        if head is not None and head != loaded.head:
            raise AqaError(f"--head {head} but {Path(weights).name} holds a {loaded.head} head",
                           fix="drop --head, or pass that head's checkpoint")
        if preset and loaded.preset and preset != loaded.preset:
            raise AqaError(f"--preset {preset} but {Path(weights).name} was trained for {loaded.preset}",
                           fix=f"drop --preset, or use --preset {loaded.preset}")
        name = loaded.preset or preset or ""
        return HeadChoice(name, _try_preset(name) if name else None, [loaded])

    # A deployment with its own weights folder (AQA_WEIGHTS_DIR) may name its own default preset.
    name = preset or os.environ.get("AQA_DEFAULT_PRESET") or DEFAULT_PRESET
    if name not in list_presets():
        load_preset(name)  # raises the registry's "unknown preset" error, with the list
    combined = load_preset(name)
    if combined.combine:
        return _choose_parts(combined, head, all_heads)
    notes: list[str] = []
    candidates = shipped_heads_for(name, notes=notes)
    if head is not None:
        if head not in list_heads():
            raise AqaError(f"unknown head {head!r}", fix=f"choose one of: {', '.join(list_heads())}")
        path = shipped_dir() / f"{name}-{head}.safetensors"
        have = ", ".join(h.head for h in candidates) or "none"
        if not path.is_file():
            raise AqaError(f"no {head} head ships for preset {name} ({path} is absent; shipped: {have})",
                           fix="pass --weights FILE.safetensors, or choose a shipped head")
        candidates = [load_head(path)]  # a damaged file is refused here, with its own message
    if not candidates:
        raise AqaError(f"no trained head ships for preset {name} (none in {shipped_dir()})",
                       fix=f"pass --weights FILE.safetensors (from `aqa train`), or put {name}-<head>.safetensors "
                           "in that folder (AQA_WEIGHTS_DIR points it elsewhere)")
    return HeadChoice(name, load_preset(name), candidates if (all_heads or head) else [default_head(candidates)],
                      notes)


def _choose_parts(preset: Preset, head: str | None, all_heads: bool) -> HeadChoice:
    """The heads of a preset that sums others (fisv = fisv-tes + fisv-pcs): each part's default (or ``head``)."""
    if all_heads:
        raise AqaError(f"--all-heads compares one target's heads, and {preset.name} sums several",
                       fix=f"use --preset {' or --preset '.join(preset.combine)} with --all-heads")
    heads, notes = [], []
    for part in preset.combine:
        choice = choose_heads(part, head)
        heads.extend(choice.heads)
        notes.extend(choice.notes)
    return HeadChoice(preset.name, preset, heads, notes, total_target=preset.target)


# A head whose own weights and scores say what each clip does, by the bar of issue 13: faithfulness ≥ 0.9.
FAITHFUL_HEAD_RHO = 0.9


def default_head(candidates: list[LoadedHead]) -> LoadedHead:
    """The head a preset scores with: the most accurate by cross-validated ρ (``candidates`` come sorted so), unless
    a faithful head (faithfulness ≥ FAITHFUL_HEAD_RHO) is within the noise of it, the larger of the two heads' CV
    standard errors; then that faithful head, whose weights and scores are then true at no measurable cost."""
    best = candidates[0]
    faithful = [h for h in candidates if (h.faithfulness[0] or 0.0) >= FAITHFUL_HEAD_RHO]
    if not faithful or faithful[0] is best or best.cv_spearman is None or faithful[0].cv_spearman is None:
        return best
    pick = faithful[0]
    noise = max(best.cv_se or 0.0, pick.cv_se or 0.0)
    return pick if best.cv_spearman - pick.cv_spearman <= noise else best


# ------------------------------------------------------------------------------------------------ scoring


class ScoreEvents:
    """Progress hooks for :meth:`Scorer.score_all`; the CLI overrides them to draw bars."""

    def input_started(self, path: Path) -> None: ...

    def backbone_loading(self, name: str) -> None: ...

    def clips_planned(self, path: Path, clips: int) -> None: ...

    def clips_done(self, n: int) -> None: ...

    def input_finished(self, results: list[VideoScore]) -> None: ...


BackboneFactory = Callable[[str], Backbone]


EFFECT_MODES = ("auto", "always", "never")
# Over this many clips, `--effects auto` skips the measured effects of a head without a one-pass shortcut: each
# costs T passes of T - 1 clips, T^2 to T^3 work (interp: 8-9.5 s at 300 clips on 2 cores, bench/bench_effects.py,
# so minutes past 600 and most of an hour at 2000). Fis-V programs have at most 302 clips.
MAX_MEASURED_CLIPS = 600


def effects_skipped(model: torch.nn.Module, features: np.ndarray, mode: str) -> str | None:
    """Why the measured effects of ``model`` on a video's ``features`` [T, D] are not computed, or None to compute
    them."""
    if mode == "never":
        return "clip effects not measured (--effects never): the head's weights and scores are shown unchecked"
    clips = len(features)
    if mode == "always" or clips <= MAX_MEASURED_CLIPS:
        return None
    # A head that scores every clip-removed video exactly in one pass (the clip-additive head) costs nothing more.
    one_pass = getattr(model, "scores_without_each_clip", None)
    if one_pass is not None and one_pass(torch.as_tensor(np.asarray(features, dtype=np.float32))) is not None:
        return None
    return (f"clip effects not measured: {clips} clips, over {MAX_MEASURED_CLIPS}, where this head's effects cost "
            "minutes to an hour (T passes of T - 1 clips); --effects always measures them anyway")


class Scorer:
    """Scores inputs with a fixed set of heads; features are shared between heads and cached.

    ``backbone`` forces the backbone (it must be the one in every head's contract);
    ``cache`` None disables the feature cache. ``backbone_factory(name)`` builds a
    backbone (default: :func:`~aqa_cli.backbones.create_backbone` with ``device`` and
    ``precision``); it is called at most once per backbone, and only when a video
    misses the cache. ``stats`` counts backbone runs and cache hits.
    """

    def __init__(self, choice: HeadChoice, *, backbone: str | None = None, device: str = "auto",
                 precision: str = "fp32", cache: FeatureCache | None = None, batch_size: int | None = 4,
                 decoder: str = "auto", backbone_factory: BackboneFactory | None = None,
                 events: ScoreEvents | None = None, backbone_weights: str | None = None,
                 trust_features: bool = False, level: float = 0.9, strict_domain: bool = False,
                 effects: str = "auto"):
        if precision not in PRECISIONS:
            raise AqaError(f"unknown precision {precision!r}", fix=f"choose one of: {', '.join(PRECISIONS)}")
        self.choice = choice
        self.heads = choice.heads
        self.device = resolve_device(device)
        self.precision = precision
        self.cache = cache
        self.batch_size = batch_size
        self.decoder = decoder
        self.events = events or ScoreEvents()
        # Other weights for the backbone: a registry name or a checkpoint file (create_backbone's ``weights``).
        self.backbone_weights = backbone_weights
        self.trust_features = trust_features
        if effects not in EFFECT_MODES:
            raise AqaError(f"unknown --effects {effects!r}", fix=f"choose one of: {', '.join(EFFECT_MODES)}")
        self.effects = effects
        from aqa_cli.calibration import conformal_quantile

        conformal_quantile([0.0], level)  # a level outside (0, 1) is refused before any video is read
        self.level = level
        self.strict_domain = strict_domain
        self.trust = {id(h): head_trust(h) for h in choice.heads}
        self._user_identity: dict[str, tuple[str, str | None]] = {}
        # Each backbone's precision, resolved once (``auto`` becomes what it runs at): the cache key records it.
        self.precisions: dict[str, str] = {}
        self._factory = backbone_factory or (
            lambda name: create_backbone(name, device=device, precision=self.precision_for(name),
                                         weights=backbone_weights))
        self._backbones: dict[str, Backbone] = {}
        self.stats = {"backbone_runs": 0, "cache_hits": 0, "backbones_built": 0}
        self.backbone_override = backbone
        for h in self.heads:
            need = h.required_features()
            if not need["backbone"]:
                raise AqaError("records no backbone in its feature contract",
                               path=h.path, fix="re-train it with `aqa train` (it records the contract)")
            if backbone is not None and backbone != need["backbone"]:
                get_backbone_spec(backbone)  # an unknown name gets the registry's message
                raise FeatureError(f"--backbone {backbone}, but {h.path.name} was trained on {need['backbone']} "
                                   f"features", fix=f"drop --backbone, or use --backbone {need['backbone']}")
            h.to(self.device)
        if backbone_weights is not None:
            needed = {h.required_features()["backbone"] for h in self.heads}
            if len(needed) > 1:
                raise AqaError(f"--backbone-weights, but the heads read features of several backbones "
                               f"({', '.join(sorted(needed))})", fix="score with one head (--head or --weights)")
            # Refused before any video is decoded: every video would fail the same way.
            name, _ = self._weights_identity(get_backbone_spec(needed.pop()))
            for h in self.heads:
                if not trust_features:
                    h.check_weights(name, f"--backbone-weights {backbone_weights}",
                                    source={"path": str(backbone_weights)})

    # -- the public entry points

    def score_all(self, inputs: Sequence[str | Path]) -> list[VideoScore]:
        """Score every input with every head; video-major, in the heads' order."""
        results: list[VideoScore] = []
        for path in inputs:
            path = Path(path)
            self.events.input_started(path)
            scores = self.score(path)
            self.events.input_finished(scores)
            results.extend(scores)
        return results

    def score(self, path: str | Path) -> list[VideoScore]:
        """One result per head for ``path``; failures are results too (status "failed")."""
        path = Path(path)
        kind = "features" if path.suffix.lower() == FEATURE_SUFFIX else "video"
        started = time.perf_counter()
        memo: dict[str, ClipFeatures | AqaError] = {}
        results = []
        for h in self.heads:
            result = self._blank(path, kind, h)
            try:
                need = h.required_features()
                if need["backbone"] not in memo:
                    try:
                        memo[need["backbone"]] = self._features(path, kind, need["backbone"], result.timings)
                    except WeightsError:
                        raise
                    except AqaError as exc:  # this input's fault: every head reading these features fails with it
                        memo[need["backbone"]] = exc
                feats = memo[need["backbone"]]
                if isinstance(feats, AqaError):
                    raise feats
                self._apply_head(h, feats, path, result)
            except WeightsError:
                # Backbone weights that are absent or damaged fail every video alike: stop the batch
                # with the one-line message (fetch / import) instead of a row per video.
                raise
            except AqaError as exc:
                result.status, result.error = "failed", exc.message if exc.path else f"{path}: {exc.message}"
            result.timings["total_s"] = time.perf_counter() - started
            results.append(result)
        if self.choice.total_target:
            results.append(self._total(path, kind, results))
        return results

    def _total(self, path: Path, kind: str, parts: list[VideoScore]) -> VideoScore:
        """The sum of the parts' results (fisv: TES + PCS), with the interval of their joint residuals."""
        from aqa_cli.calibration import Calibration

        calibrations = [self.trust[id(h)][0] for h in self.heads]
        joint: Calibration | None = None
        if all(c is not None for c in calibrations):
            joint = calibrations[0]
            for c in calibrations[1:]:
                joint = joint.combined(c, self.choice.total_target or "total")
        preset = self.choice.preset
        total = combine_results(path, kind, parts, self.choice.preset_name, self.choice.total_target or "total",
                                unit=preset.unit if preset is not None else "points")
        if total.ok:
            attach_trust(total, joint, None, self.level,
                         missing=next((p.interval_missing for p in parts if p.interval_missing), None))
            flagged = [p.domain for p in parts if p.domain]
            total.domain = min(flagged, key=lambda d: d["p_value"]) if flagged else None
        return total

    # -- features

    def _blank(self, path: Path, kind: str, h: LoadedHead) -> VideoScore:
        preset = self.choice.preset
        scale = h.scale
        return VideoScore(
            input=path, kind=kind, preset=self.choice.preset_name, head=h.head, head_path=h.path,
            backbone=h.required_features()["backbone"] or "",
            scale={"min": scale["score_min"], "max": scale["score_max"],
                   "unit": preset.unit if preset is not None else scale["unit"]},
            demonstration=h.demonstration or (preset.demonstration_note if preset is not None else None),
            cv_spearman=h.cv_spearman, members=h.members, target=h.target,
        )

    def precision_for(self, backbone: str) -> str:
        """The precision ``backbone`` runs at for this scorer (``auto`` resolved)."""
        if backbone not in self.precisions:
            self.precisions[backbone] = resolve_precision(self.precision, self.device, get_backbone_spec(backbone))
        return self.precisions[backbone]

    def _backbone(self, name: str) -> Backbone:
        if name not in self._backbones:
            self.events.backbone_loading(name)
            try:
                self._backbones[name] = self._factory(name)
            except WeightsError as exc:
                raise self._weights_error_in_context(exc, name) from None
            self.stats["backbones_built"] += 1
        return self._backbones[name]

    def _weights_error_in_context(self, exc: WeightsError, backbone: str) -> WeightsError:
        """The backbone's weights error, saying which preset and head need them, and what scores without them."""
        heads = sorted({h.head for h in self.heads if h.required_features()["backbone"] == backbone})
        preset = self.choice.preset_name
        who = f"preset {preset} (head {', '.join(heads)}, backbone {backbone})" if preset else f"backbone {backbone}"
        fix = exc.fix
        if preset != "demo" and backbone != "i3d":
            fix = f"{fix}; or score the demo with `--preset demo`, which needs no such download" if fix else \
                "score the demo with `--preset demo`, which needs no such download"
        return WeightsError(f"{who}: {exc.reason}", path=exc.path, fix=fix)

    def _features(self, path: Path, kind: str, backbone: str, timings: dict[str, float]) -> ClipFeatures:
        t0 = time.perf_counter()
        try:
            if kind == "features":
                return self._features_from_file(path, backbone)
            return self._features_from_video(path, backbone, timings)
        finally:
            timings["features_s"] = time.perf_counter() - t0

    def _features_from_file(self, npy: Path, backbone: str) -> ClipFeatures:
        sidecar_path = npy.with_suffix(".json")
        if not npy.is_file():
            raise FeatureError("no such file", path=npy, fix="check the path")
        spec = get_backbone_spec(backbone)
        if not sidecar_path.is_file():
            # Nothing says how these features were made. Accept them only when the user vouches
            # for the backbone; the times then follow the recipe from the start of the video.
            if self.backbone_override is None:
                raise FeatureError(f"has no sidecar {sidecar_path.name} saying which backbone and recipe made it",
                                   path=npy, fix=f"pass --backbone {backbone} if it holds {backbone} features "
                                                 "made with its default recipe, or score the video itself")
            features = load_features(npy)
            recipe = spec.recipe
            step = recipe.stride / recipe.timeline_fps
            clips = [{"start_s": k * step, "end_s": k * step + recipe.clip_len / recipe.timeline_fps}
                     for k in range(len(features))]
            return ClipFeatures(features, clips, backbone, recipe.to_dict(), "file", None,
                                [f"no sidecar: clip times assume {recipe.name} clips from the start of the video"])
        sidecar = read_sidecar(sidecar_path)
        features = load_features(npy, sidecar)
        made_by = sidecar.get("backbone") or {}
        recipe = sidecar.get("recipe") or {}
        _check_not_too_short(sidecar, npy)
        video, video_note = _reachable_video(sidecar, sidecar_path)
        return ClipFeatures(features, list(sidecar.get("clips") or []), made_by.get("name") or "", recipe, "file",
                            video, list((sidecar.get("source") or {}).get("warnings", [])),
                            weights=made_by.get("weights"), weights_source=made_by.get("weights_source"),
                            video_note=video_note)

    def _features_from_video(self, video: Path, backbone: str, timings: dict[str, float]) -> ClipFeatures:
        t0 = time.perf_counter()
        try:
            if not video.is_file():
                raise VideoError("no such file" if not video.exists() else "is not a file", path=video,
                                 fix="check the path")
            video_sha = sha256_file(video)
        except OSError as exc:
            raise VideoError(f"cannot be read ({type(exc).__name__})", path=video, fix="check its permissions") from None
        timings["hash_s"] = time.perf_counter() - t0
        spec = get_backbone_spec(backbone)
        weights_name, weights_sha = self._weights_identity(spec)
        key = None
        if self.cache is not None:
            # Keyed by the weights' recorded sha256, so a cache hit needs no backbone at all;
            # weights not yet converted have no record, and are built (fetched) first.
            # A self-built backbone (pose) is not in the weights registry: its own identity names its models.
            # A checkpoint given by path is keyed by its file's sha256 (in its name), not by its path: a
            # moved or renamed copy finds its features again; the entry's sidecar records the path.
            weights_sha = weights_sha or self._backbone(backbone).weights_sha256
            key = cache_key(video_sha256=video_sha, backbone=backbone, weights=weights_name,
                            weights_sha256=weights_sha, recipe=spec.recipe.to_dict(),
                            precision=self.precision_for(backbone))
            hit = self.cache.get(key)
            if hit is not None:
                features, sidecar = hit
                self.stats["cache_hits"] += 1
                _check_not_too_short(sidecar, video)
                made_by = sidecar.get("backbone") or {}
                return ClipFeatures(features, list(sidecar["clips"]), backbone, sidecar["recipe"], "cache", video,
                                    list((sidecar.get("source") or {}).get("warnings", [])),
                                    weights=weights_name, weights_source=made_by.get("weights_source"))
        bb = self._backbone(backbone)

        def on_plan(plan) -> None:  # noqa: ANN001 - a ClipPlan
            if plan.timeline_frames < bb.recipe.clip_len:
                raise VideoError(_too_short_reason(plan.timeline_frames, bb.recipe.clip_len, plan.fps), path=video,
                                 fix="score a recording of at least one clip")
            self.events.clips_planned(video, len(plan.clips))

        result = video_features(video, bb, batch_size=self.batch_size, decoder=self.decoder, on_plan=on_plan,
                                on_batch=self.events.clips_done)
        self.stats["backbone_runs"] += 1
        sidecar = make_sidecar(result, video, video_sha256=video_sha, predictions=None)
        warnings = [*result.info.warnings, *result.plan.warnings]
        if self.cache is not None and key is not None:
            try:
                self.cache.put(key, result.features, sidecar)
            except OSError as exc:
                warnings.append(f"features not cached ({type(exc).__name__}: {exc.strerror or exc})")
        return ClipFeatures(result.features, sidecar["clips"], backbone, sidecar["recipe"], "backbone", video,
                            warnings, weights=bb.spec.weights, weights_source=bb.weights_source)

    def _weights_identity(self, spec) -> tuple[str, str | None]:  # noqa: ANN001 - a BackboneSpec
        """(weights name, sha256 of the converted weights when already converted, else None) for the backbone."""
        from aqa_cli.weights import get_spec, is_weights_path, recorded_sha256, recorded_user_sha256

        if spec.factory is not None:
            return spec.weights, None
        chosen = self.backbone_weights
        if chosen is not None and is_weights_path(chosen):
            # Hashed once per run, not once per video: the file may be hundreds of MB.
            if spec.name not in self._user_identity:
                if not Path(chosen).expanduser().is_file():
                    raise WeightsError("no such checkpoint file", path=chosen,
                                       fix="check the path; --backbone-weights takes a file or a registry name")
                self._user_identity[spec.name] = recorded_user_sha256(get_spec(spec.weights), chosen)
            return self._user_identity[spec.name]
        name = chosen or spec.weights
        get_spec(name)  # an unknown name gets the registry's message, before any contract is checked
        return name, recorded_sha256(name)

    # -- the head

    def _apply_head(self, h: LoadedHead, feats: ClipFeatures, path: Path, result: VideoScore) -> None:
        _check_contract(h, feats, path)
        trusted = h.check_weights(feats.weights, path, trust_features=self.trust_features,
                                  source=feats.weights_source)
        t0 = time.perf_counter()
        out = run_head(h, feats.features, self.device)
        result.timings["head_s"] = time.perf_counter() - t0
        score = float(out.score[0])
        if not math.isfinite(score):
            raise FeatureError(f"{h.path.name} gave a non-finite score", path=path,
                               fix=f"the checkpoint looks damaged: re-train or re-download {h.path.name}")
        check_score_in_scale(score, result.scale, h.path.name, path)
        weights = out.weights[0].double().cpu().numpy()
        clip_scores = out.clip_scores[0].double().cpu().numpy()
        # What each clip really does: the head again on the video without it (batched passes).
        t0 = time.perf_counter()
        skipped = effects_skipped(h.model, feats.features, self.effects)
        if skipped:
            measured = np.full(len(feats.features), np.nan)
        else:
            measured = measured_effects(h.model, feats.features, device=self.device, score=score)
        predicted = predicted_effects(weights, clip_scores)
        rho = faithfulness(predicted, measured)
        result.timings["effects_s"] = time.perf_counter() - t0
        clips = []
        for t, meta in enumerate(feats.clips):
            clips.append(ClipScore(
                index=int(meta.get("index", t)), start_s=float(meta["start_s"]), end_s=float(meta["end_s"]),
                weight=float(weights[t]), score=float(clip_scores[t]), effect=_finite_or_none(measured[t]),
                predicted_effect=_finite_or_none(predicted[t]),
                source_frame_start=meta.get("source_frame_start"), source_frame_end=meta.get("source_frame_end")))
        result.status = "ok"
        result.score = score
        result.clips = clips
        result.faithfulness = _finite_or_none(rho)
        result.additive = {k: float(v[0]) for k, v in out.additive.items()}
        result.extras = summarise_extras(out)
        # What the head itself says about the video besides numbers (the mtl head: action and commentary).
        describe = getattr(h.model, "describe", None)
        if describe is not None:
            result.extras.update(describe(out, 0))
            _time_step_runs(result.extras.get("steps"), clips, getattr(h.model.config, "clip_frames", None))
        result.backbone = feats.backbone
        result.features_source = feats.source
        result.video = feats.video
        result.video_note = feats.video_note
        result.warnings = list(feats.warnings) + ([trusted] if trusted else []) + ([skipped] if skipped else [])
        calibration, domain, missing = self.trust[id(h)]
        attach_trust(result, calibration, domain, self.level, missing=missing, features=feats.features)
        if self.strict_domain and result.domain and not result.domain["in_domain"]:
            raise FeatureError(f"{domain_sentence(result.domain)}; not scored because of --strict-domain",
                               path=path, fix="score videos like the head's training videos, or drop --strict-domain")


# ------------------------------------------------------------------------------------------------ trust


def head_trust(h: LoadedHead) -> tuple[Any, Any, str | None]:
    """(calibration or None, domain model or None, why there is no interval): read once per head file."""
    from aqa_cli.calibration import read_calibration, read_domain

    calibration = read_calibration(h.metadata)
    missing = None
    if calibration is None:
        missing = (f"{h.path.name} holds no calibration data (it was trained without --folds, or before intervals "
                   "existed): no interval is shown rather than a made-up one")
    return calibration, read_domain(h.path, h.metadata), missing


def attach_trust(result: VideoScore, calibration: Any, domain: Any, level: float, *, missing: str | None = None,
                 features: np.ndarray | None = None) -> None:
    """The interval, the rank among the training videos, the domain check and the clip-scale note of a result."""
    scale = {"min": result.scale.get("min"), "max": result.scale.get("max")}
    if calibration is not None:
        interval = calibration.interval(result.score, level, {k: v for k, v in scale.items() if v is not None})
        if math.isfinite(interval["half_width"]):
            result.interval = interval
        else:
            result.interval_missing = (f"{calibration.n} calibration videos are too few for a {level:.0%} interval")
        result.rank = calibration.rank(result.score)
    else:
        result.interval_missing = missing
    if domain is not None and features is not None:
        result.domain = domain.check(features)
    elif features is not None:
        result.domain_missing = (f"{result.head_label} holds no model of its training videos, so nothing checks "
                                 "that this video is like them")
    lo, hi = scale["min"], scale["max"]
    outside = [c.score for c in result.clips if (lo is not None and c.score < lo) or (hi is not None and c.score > hi)]
    if outside:
        worst = max(outside, key=lambda v: max((lo or 0.0) - v, v - (hi if hi is not None else v)))
        result.clip_scale_note = (
            f"{len(outside)} clip score(s) lie outside the {lo:g}–{hi:g} scale (e.g. {worst:.2f}): a clip score is "
            "the head's value for that clip before weighting, not a score a clip could be given; only the weighted "
            "sum is on the scale")


def domain_sentence(domain: dict[str, Any]) -> str:
    """The domain check in words."""
    against = domain.get("compared_with") or "the head's training videos"
    if domain["in_domain"]:
        return f"like {against} (domain check p = {domain['p_value']:.3f})"
    return (f"this video is unlike {against} (p = {domain['p_value']:.3f}): the score is not meaningful")


def combine_results(path: Path, kind: str, parts: list[VideoScore], preset: str, target: str, *,
                    unit: str = "points") -> VideoScore:
    """The sum of several heads' results on one video: score, scale, additive terms and per-clip explanation.

    Clip t's effect is the sum of its effects (removing a clip removes it from every part), its weight the parts'
    mean weight and its score Σ_k w_kt·s_kt over that weight, so Σ_t w_t·s_t is the sum of the parts' Σ w·s."""
    total = VideoScore(input=path, kind=kind, preset=preset, head="+".join(p.head_label for p in parts),
                       target=target, parts=list(parts))
    bad = [p for p in parts if not p.ok]
    if bad:
        total.error = bad[0].error
        return total
    first = parts[0]
    total.status, total.score = "ok", float(sum(p.score for p in parts))
    total.scale = {"min": sum(p.scale["min"] for p in parts), "max": sum(p.scale["max"] for p in parts), "unit": unit}
    total.additive = {f"{p.target} {k}": v for p in parts for k, v in p.additive.items()}
    clips = []
    for t, c in enumerate(first.clips):
        pieces = [p.clips[t] for p in parts]
        weight = sum(q.weight for q in pieces) / len(pieces)
        effects = [q.effect for q in pieces]
        predicted = [q.predicted_effect for q in pieces]
        clips.append(ClipScore(
            index=c.index, start_s=c.start_s, end_s=c.end_s, weight=weight,
            score=sum(q.contribution for q in pieces) / weight if weight > 0 else 0.0,
            effect=None if None in effects else float(sum(effects)),
            predicted_effect=None if None in predicted else float(sum(predicted)),
            source_frame_start=c.source_frame_start, source_frame_end=c.source_frame_end))
    total.clips = clips
    if all(c.effect is not None and c.predicted_effect is not None for c in clips):
        total.faithfulness = _finite_or_none(faithfulness(np.array([c.predicted_effect for c in clips]),
                                                          np.array([c.effect for c in clips])))
    total.backbone, total.features_source, total.video = first.backbone, first.features_source, first.video
    total.demonstration = first.demonstration
    total.warnings = list(dict.fromkeys(w for p in parts for w in p.warnings))
    total.cv_spearman = None
    total.members = 1
    return total


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _time_step_runs(runs: list[dict] | None, clips: list[ClipScore], clip_frames: int | None) -> None:
    """Give per-frame step runs (frames counted from the first clip's first frame) their times in seconds."""
    if not runs or not clip_frames or not clips:
        return
    def frame_span(frame: int) -> tuple[float, float]:
        clip = clips[min(frame // clip_frames, len(clips) - 1)]
        step = (clip.end_s - clip.start_s) / clip_frames
        start = clip.start_s + (frame % clip_frames) * step
        return start, start + step

    for run in runs:
        run["start_s"] = round(frame_span(run["frame_start"])[0], 3)
        run["end_s"] = round(frame_span(run["frame_end"] - 1)[1], 3)


def _check_contract(h: LoadedHead, feats: ClipFeatures, path: Path) -> None:
    need = h.required_features()
    h.check_contract(feats.backbone or None, (feats.recipe or {}).get("name"), path)
    # Same recipe name, other settings (e.g. --clip-len 16 at extraction): still another recipe.
    try:
        default = get_backbone_spec(feats.backbone).recipe.to_dict() if feats.backbone else None
    except AqaError:
        default = None
    if default is not None and feats.recipe.get("name") == default["name"] and len(feats.recipe) > 1:
        changed = sorted(k for k in default if feats.recipe.get(k) != default[k])
        if changed:
            settings = ", ".join(f"{k} {feats.recipe.get(k)}" for k in changed)
            raise FeatureError(f"features were made with a modified {default['name']} recipe ({settings}) but "
                               f"{h.path.name} was trained on the recipe as published", path=path,
                               fix="re-extract without recipe options, or score the video itself")
    dim = int(feats.features.shape[1])
    if need["feature_dim"] is not None and dim != need["feature_dim"]:
        raise FeatureError(f"features are {dim}-d but {h.path.name} expects {need['feature_dim']}-d", path=path,
                           fix=f"extract them with --backbone {need['backbone']}")
    if len(feats.features) == 0:
        raise FeatureError("holds no clips", path=path, fix="re-extract it from a video of at least one clip")
    if len(feats.clips) != len(feats.features):
        raise FeatureError(f"the sidecar lists {len(feats.clips)} clips for {len(feats.features)} feature rows",
                           path=path, fix="re-extract it")


@torch.inference_mode()
def run_head(h: LoadedHead, features: np.ndarray, device: torch.device | str = "cpu") -> HeadOutput:
    """The head on one video's features [T, D] (a batch of one, no padding)."""
    # A copy: the features may be a read-only memory map of a feature file.
    x = torch.tensor(np.asarray(features, dtype=np.float32)).unsqueeze(0).to(device)
    return h.model(x)


def summarise_extras(out: HeadOutput) -> dict[str, Any]:
    """What of a head's extras means something to a reader, as plain numbers for one video."""
    ex = out.extras
    summary: dict[str, Any] = {}
    if "grade_probs" in ex and "grade_values" in ex:
        probs = ex["grade_probs"][0].double().cpu().tolist()
        values = ex["grade_values"][0].double().cpu().tolist()
        summary["grades"] = [{"value": v, "prob": p} for v, p in zip(values, probs)]
    if "member_scores" in ex:
        summary["member_scores"] = ex["member_scores"][0].double().cpu().tolist()
    if "coarse_score" in ex:
        summary["coarse_score"] = float(ex["coarse_score"][0])
    if "subgrade" in ex:
        summary["subgrade"] = int(ex["subgrade"][0])
    return summary


def _too_short_reason(frames: int, clip_len: int, fps: float) -> str:
    return (f"only {frames} frames at {fps:g} fps, shorter than one {clip_len}-frame clip "
            f"({clip_len / fps:.2f} s): too short to score")


def _check_not_too_short(sidecar: dict, path: Path) -> None:
    timeline = sidecar.get("timeline") or {}
    clip_len = (sidecar.get("recipe") or {}).get("clip_len")
    frames = timeline.get("timeline_frames")
    if isinstance(frames, int) and isinstance(clip_len, int) and frames < clip_len:
        raise VideoError(_too_short_reason(frames, clip_len, float(timeline.get("fps") or 25.0)), path=path,
                         fix="score a recording of at least one clip")


def _reachable_video(sidecar: dict, sidecar_path: Path) -> tuple[Path | None, str | None]:
    """(the video a feature file was made from, if it is still there with the recorded sha256; else None and why).

    Without a recorded sha256 nothing shows that a file at the named path is that video, so none is opened.
    A relative path is taken from the sidecar's folder (where extract-features ran is not recorded).
    """
    named = sidecar.get("video")
    if not named:
        return None, None
    want = sidecar.get("video_sha256")
    if not want:
        return None, ("the sidecar records no video_sha256, so the video it names cannot be verified and no frames "
                      "are shown")
    named = Path(named)
    for candidate in (named if named.is_absolute() else sidecar_path.parent / named, sidecar_path.parent / named.name):
        try:
            if candidate.is_file() and sha256_file(candidate) == want:
                return candidate, None
        except OSError:
            continue
    return None, None


# ------------------------------------------------------------------------------------------------ agreement


def head_agreement(results: Sequence[VideoScore]) -> dict[str, Any]:
    """How far several heads agree: per video the spread of their scores, and across videos
    (three or more scored by every head) the Spearman ρ between each pair of heads."""
    from aqa_cli.metrics import spearman

    by_video: dict[str, dict[str, VideoScore]] = {}
    for r in results:
        if r.ok:
            by_video.setdefault(str(r.input), {})[r.head_label] = r
    heads = list(dict.fromkeys(r.head_label for r in results))
    videos = []
    for video, scored in by_video.items():
        scores = np.array([scored[h].score for h in heads if h in scored], dtype=np.float64)
        span = max(next(iter(scored.values())).scale.get("max", 1.0) - next(iter(scored.values())).scale.get("min", 0.0),
                   1e-12)
        # The clip that moves each head's score most (measured), which every head has, faithful or not.
        top = {h: max(scored[h].clips, key=lambda c: (abs(c.effect or 0.0), -c.index)).index
               for h in heads if h in scored and scored[h].clips}
        videos.append({"video": video, "scores": {h: scored[h].score for h in heads if h in scored},
                       "mean": float(scores.mean()), "spread": float(scores.max() - scores.min()),
                       "spread_of_scale": float((scores.max() - scores.min()) / span),
                       "std": float(scores.std()), "top_effect_clip": top,
                       "top_effect_clip_agrees": len(set(top.values())) <= 1})
    pairs = []
    complete = [v for v in by_video.values() if all(h in v for h in heads)]
    if len(complete) >= 3:
        for i, a in enumerate(heads):
            for b in heads[i + 1:]:
                pairs.append({"heads": [a, b], "spearman": spearman(np.array([v[a].score for v in complete]),
                                                                     np.array([v[b].score for v in complete])),
                              "n": len(complete)})
    return {"heads": heads, "videos": videos, "pairwise_spearman": pairs}


def failed(results: Sequence[VideoScore]) -> list[VideoScore]:
    return [r for r in results if not r.ok]
