"""Scoring heads: clip features in, a score with its per-clip reasons out.

Every head maps clip features ``[B, T, D]`` and a mask ``[B, T]`` (True for a
real clip, False for padding) to a :class:`HeadOutput`:

* ``score`` on the preset's own scale (e.g. Fis-V TES points);
* per-clip ``weights`` w_t (≥ 0, summing to 1 over the real clips, 0 on padding)
  and per-clip ``clip_scores`` s_t on the same scale, with
  ``Σ_t w_t·s_t + Σ additive == score``;
* ``additive``: terms added after the weighted sum, reported separately
  (CoFInAl's fine sub-grade term); empty for most heads;
* ``extras``: what the head exposes besides (grade probabilities, attention
  maps) and what its loss needs (decoder embeddings).

Heads that learn from more than the score (``mtl``: action classes and a
commentary) say so through three hooks: ``label_columns`` (the label-file columns
they read), ``prepare_config`` (complete the config from the training data, e.g. a
vocabulary) and ``encode_labels`` (those columns as tensors, handed to ``loss``).
``describe`` turns their extras into plain data for ``aqa score``.

One module per head (``gdlt.py``, ``cofinal.py``, ``interp.py``, ``mtl.py``, ``pose.py``, ``additive.py``), each with a
config dataclass derived from :class:`HeadConfig` and a model derived from
:class:`Head`; ``create_head`` and ``list_heads`` form the registry.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from aqa_cli.errors import AqaError

if TYPE_CHECKING:
    from aqa_cli.dataset import FeatureSet


def dataclass_from_dict(cls: type, values: dict[str, Any], what: str) -> Any:
    """``cls(**values)``, refusing unknown keys by name (a typo in a preset or ``--set`` must not pass silently)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise AqaError(f"unknown {what}: {', '.join(unknown)}", fix=f"valid settings are: {', '.join(sorted(known))}")
    return cls(**values)


@dataclass
class HeadConfig:
    """What every head needs; each head's config adds its own fields (with the paper's defaults)."""

    in_dim: int = 1024
    # The target's range on its own scale: the head predicts in [0, 1] and maps it here.
    score_min: float = 0.0
    score_max: float = 1.0
    dropout: float = 0.3

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HeadConfig:
        return dataclass_from_dict(cls, values, f"{cls.__name__} settings")

    @property
    def score_span(self) -> float:
        return self.score_max - self.score_min


@dataclass
class HeadOutput:
    score: Tensor  # [B]
    weights: Tensor  # [B, T]
    clip_scores: Tensor  # [B, T]
    additive: dict[str, Tensor] = field(default_factory=dict)  # name → [B]
    extras: dict[str, Tensor] = field(default_factory=dict)

    def additive_total(self) -> Tensor:
        total = torch.zeros_like(self.score)
        for term in self.additive.values():
            total = total + term
        return total


class Head(nn.Module):
    """Base class: subclasses set ``name``, ``config_class`` and implement ``forward`` and ``loss``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[HeadConfig]] = HeadConfig
    # True for a head whose forward pass also reads labels (``forward(features, mask, labels=...)``): the pose
    # head picks exemplars of the query's own dive type. Training passes the batch's rows of encode_labels,
    # labelled inference those of inference_labels.
    forward_reads_labels: ClassVar[bool] = False

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config

    def forward(self, features: Tensor, mask: Tensor | None = None) -> HeadOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, out: HeadOutput, target: Tensor) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover
        """Training loss for targets on the preset's scale: (total, {component: value}).

        A head whose ``encode_labels`` returns tensors is called as ``loss(out, target, labels)`` with
        those tensors' rows for the batch."""
        raise NotImplementedError

    # -- a shortcut for the measured effects (aqa_cli.effects): the part of the forward pass that reads each clip
    # alone, computed once per video instead of once per clip-removed copy of it

    def map_each_clip(self, features: Tensor) -> Tensor | None:
        """[B, T, in] → [B, T, e]: the head's first step where, in eval mode, clip t's output depends on clip t
        alone (a per-clip projection), or None when the head has no such step (or is training, when BatchNorm
        mixes clips). ``forward(f, m)`` equals ``forward_mapped(map_each_clip(f), m)`` wherever it is not None."""
        return None

    def forward_mapped(self, mapped: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """The rest of the forward pass, from :meth:`map_each_clip`'s output (mask None: every clip is real)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-clip map")

    # -- hooks for heads that learn from more than the score (defaults: they read nothing else)

    @classmethod
    def label_columns(cls, config: HeadConfig) -> list[str]:
        """Label-file columns besides the target that this head learns from (they enter the data fingerprint)."""
        return []

    @classmethod
    def prepare_config(cls, config: HeadConfig, data: FeatureSet) -> HeadConfig:
        """The config completed from the training data (``data.aux``: each label column's text); checks it too."""
        return config

    def encode_labels(self, data: FeatureSet) -> dict[str, Tensor] | None:
        """The auxiliary labels of ``data`` as tensors with one row per video, or None when the head reads none."""
        return None

    def inference_labels(self, data: FeatureSet) -> dict[str, Tensor] | None:
        """Labels the forward pass reads at labelled inference (``aqa evaluate``, cross-validation folds), one row
        per video; None by default. Unlike encode_labels it changes nothing in the head."""
        return None

    def describe(self, out: HeadOutput, index: int = 0) -> dict[str, Any]:
        """Plain data about video ``index`` of ``out`` for reports (action names, text); none by default."""
        return {}

    def apply_labels(self, scores: Any, data: FeatureSet) -> Any:
        """Predicted scores (numpy [videos]) made into the target's, where the labels of ``data`` say more: the
        ``pose`` head learns execution scores and multiplies them by each dive's difficulty here. Identity by
        default. Training (fold predictions) and ``aqa evaluate`` call it."""
        return scores

    # -- helpers shared by the heads

    def normalise(self, score: Tensor) -> Tensor:
        """Preset scale → [0, 1]."""
        return (score - self.config.score_min) / self.config.score_span

    def denormalise(self, unit: Tensor) -> Tensor:
        """[0, 1] → preset scale."""
        return self.config.score_min + unit * self.config.score_span


def full_mask(features: Tensor) -> Tensor:
    return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)


def check_inputs(features: Tensor, mask: Tensor | None, in_dim: int) -> Tensor:
    """Validate shapes and return the mask (all-real when None)."""
    if features.dim() != 3 or features.shape[-1] != in_dim:
        raise AqaError(f"features of shape {tuple(features.shape)} do not fit a head expecting [B, T, {in_dim}]",
                       fix=f"extract features with a {in_dim}-d backbone")
    if mask is None:
        return full_mask(features)
    if mask.shape != features.shape[:2]:
        raise AqaError(f"mask of shape {tuple(mask.shape)} does not match features {tuple(features.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise AqaError("a video in the batch has no real clip")
    return mask.bool()


def attention_decomposition(grade_probs: Tensor, attention: Tensor, grade_values: Tensor,
                            mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-clip weights and scores of a Σ_g p_g·v_g score whose grades attend over the clips.

    grade_probs [B, G] (summing to 1), attention [B, G, T] (each row summing to 1 over real
    clips), grade_values [G] in score units. w_t = Σ_g p_g·a_gt, s_t = Σ_g p_g·a_gt·v_g / w_t,
    so Σ_t w_t·s_t = Σ_g p_g·v_g exactly. A clip no grade attends to gets w_t = 0 and s_t = 0.
    """
    contrib = grade_probs.unsqueeze(-1) * attention  # [B, G, T]
    weights = contrib.sum(dim=1) * mask
    weighted = (contrib * grade_values.view(1, -1, 1)).sum(dim=1) * mask
    scores = torch.where(weights > 0, weighted / weights.clamp_min(torch.finfo(weights.dtype).tiny),
                         torch.zeros_like(weighted))
    return weights, scores


# ------------------------------------------------------------------------------------------------- registry

def _registry() -> dict[str, type[Head]]:
    from aqa_cli.heads import additive, cofinal, gdlt, interp, mtl, pose

    return {cls.name: cls for cls in (gdlt.GDLT, cofinal.CoFInAl, interp.InterpHead, mtl.MTLHead, pose.PoseHead,
                                      additive.AdditiveHead)}


def list_heads() -> list[str]:
    return sorted(_registry())


def head_class(name: str) -> type[Head]:
    reg = _registry()
    if name not in reg:
        raise AqaError(f"unknown head {name!r}", fix=f"choose one of: {', '.join(sorted(reg))}")
    return reg[name]


def create_head(name: str, config: HeadConfig | dict[str, Any] | None = None) -> Head:
    """Build head ``name`` from a config (a dict is checked against the head's config fields)."""
    cls = head_class(name)
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    return cls(config)
