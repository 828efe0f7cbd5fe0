"""GDLT: Likert scoring with grade decoupling (Xu, Zeng and Zheng, CVPR 2022).

Clip features are projected (Conv1d 1024→512→256 with BatchNorm), encoded by a
transformer encoder without positional encoding, and read by one learned query
per grade through a transformer decoder. Each grade's response is the diagonal
of a linear map of the decoded queries, squashed by a sigmoid and normalised
into grade probabilities p_g; the score is Σ_g p_g·v_g with fixed grade values
v_g evenly spaced over the score range.

The explanation is exact: with a_gt the last decoder layer's cross-attention of
grade g on clip t, w_t = Σ_g p_g·a_gt and s_t = Σ_g p_g·a_gt·v_g / w_t give
Σ_t w_t·s_t = Σ_g p_g·v_g.

Parameter names follow the official repository (``in_proj``, ``transformer``,
``prototype``, ``regressor``), so its state dicts load unchanged
(:func:`state_dict_from_official`). Unlike it, nothing is tied to CUDA, padded
clips are masked out of attention, and the score range is a setting rather
than a fixed ÷25.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqa_cli.heads import HeadConfig, HeadOutput, attention_decomposition, full_mask
from aqa_cli.heads.layers import (
    ClipProjection,
    ProjectedClipsHead,
    decode_grades,
    grade_transformer,
    official_stem_shapes,
    sigmoid_normalised,
)
from aqa_cli.heads.layers import official_state_dict as state_dict_from_official


@dataclass
class GDLTConfig(HeadConfig):
    hidden_dim: int = 256
    n_head: int = 1
    n_encoder: int = 1
    n_decoder: int = 2
    n_grades: int = 4
    ffn_factor: int = 3  # FFN width = 3 × hidden (768), as published
    alpha: float = 1.0  # weight of the triplet loss
    margin: float = 1.0  # triplet margin (cosine distance)
    # Weight of the MSE on the [0, 1] scale. The official code regresses labels ÷ 25; a wider scale (Fis-V TES
    # needs 0–50) shrinks the MSE against the triplet term by (50/25)² = 4, and the head then barely fits.
    mse_weight: float = 1.0


class GDLT(ProjectedClipsHead):
    name = "gdlt"
    config_class = GDLTConfig

    def __init__(self, config: GDLTConfig):
        super().__init__(config)
        c = config
        self.in_proj = ClipProjection(c.in_dim, c.hidden_dim)
        self.transformer = grade_transformer(c.hidden_dim, c.n_head, c.n_encoder, c.n_decoder,
                                             c.ffn_factor * c.hidden_dim, c.dropout)
        self.prototype = nn.Embedding(c.n_grades, c.hidden_dim)
        self.regressor = nn.Linear(c.hidden_dim, c.n_grades)
        self.register_buffer("grade_values", torch.linspace(0, 1, c.n_grades), persistent=False)

    def forward_mapped(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        mask = full_mask(x) if mask is None else mask.bool()
        pad = ~mask
        memory = self.transformer.encoder.forward_projected(x, src_key_padding_mask=pad)
        q, cross = decode_grades(self.transformer, self.prototype, memory, pad)
        responses = torch.diagonal(self.regressor(q), dim1=-2, dim2=-1)  # [B, G]
        probs = sigmoid_normalised(responses)
        unit = (probs * self.grade_values).sum(dim=1)
        values = self.denormalise(self.grade_values)
        weights, clip_scores = attention_decomposition(probs, cross, values, mask)
        return HeadOutput(score=self.denormalise(unit), weights=weights, clip_scores=clip_scores,
                          extras={"grade_probs": probs, "grade_values": values.expand_as(probs),
                                  "cross_attention": cross, "embeddings": q})

    def loss(self, out: HeadOutput, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        mse = self.config.mse_weight * F.mse_loss(self.normalise(out.score), self.normalise(target))
        emb = out.extras["embeddings"]
        labels = torch.arange(emb.shape[1], device=emb.device).repeat(emb.shape[0])
        tri = hardest_triplet_loss(emb.reshape(-1, emb.shape[-1]), labels, self.config.margin)
        total = mse + self.config.alpha * tri
        return total, {"mse": float(mse.detach()), "triplet": float(tri.detach())}


def hardest_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Batch-hardest triplet loss on cosine distance: each anchor against its farthest positive and
    nearest negative. GDLT labels each decoded query with its grade, pushing grades apart."""
    unit = F.normalize(embeddings, dim=-1)
    dist = 1 - unit @ unit.T
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    hardest_pos = (dist * (same & ~eye)).max(dim=1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def config_from_official(state: Mapping[str, Tensor], score_max: float = 25.0) -> GDLTConfig:
    """Infer the architecture from an official state dict; its scores were labels ÷ 25."""
    return GDLTConfig(**official_stem_shapes(state_dict_from_official(state)), score_min=0.0, score_max=score_max)
