"""CoFInAl: coarse-to-fine instruction alignment (Zhou et al., IJCAI 2024).

CoFInAl turns score regression into two classifications, the way a judge first
places a performance in a grade and then within it. On the normalised score
y ∈ [0, 1] (Eq. 6):

    y ≈ ĉ·S_C + ĵ·S_F,   grade ĉ out of G, sub-grade ĵ out of K, S_F = S_C / K.

The model, on clip features [B, T, D_C]:

* projection: Conv1d D_C → D_C/2 → D_S with BatchNorm (D_C, D_P, D_S = 1024, 512,
  256 in the paper; the official code realises D_P as this inner width);
* TFM (Sect. 3.2): a transformer encoder gives the clips temporal context, then
  the procedure-aware attention of Eq. 7 fuses them into P procedure features:
  each clip proposes P queries, their average over the real clips (avgPool of
  Q_T) asks the clips, softmax(Q̃_T K_Tᵀ/√D) V_T. P = 0 skips the pooling (the
  official code, where the grades read the clips directly);
* GPM (Sect. 3.3): G learnable grade prototypes query the procedures through a
  transformer decoder (Eq. 9); its output H_C holds one response per grade.
  Each response's logit is the diagonal of a linear map of H_C (the official
  ``regressor``); p_g = σ(logit_g) / Σ_j σ(logit_j) are the grade
  probabilities, trained with the cross-entropy L_C. The prototypes are tied to
  the quality axis by the graph regularisation L_R (Eq. 8);
* FGS (Sect. 3.4): the fine feature h_F = avgPool_g(M ⊙ (H_C − G)) with the
  grade mask M = softmax_g(avgPool_d(H_C)) (Eq. 10–11) is classified by the
  nearest column of a FIXED simplex equiangular tight frame E (Eq. 12–14; a
  buffer, never trained), trained with L_F = ½·mean((⟨h̄_F, e_j*⟩ − 1)²)
  (Eq. 15) against the true sub-grade's column.

Score. The paper predicts the grade with an argmax; here the coarse score is
the differentiable expected grade Σ_g p_g·v_g with v_g = g·S_C (the value of
Eq. 6 for grade g), so the score loss L_S (Eq. 1–2) trains it and the score
decomposes exactly over the clips. The sub-grade stays the paper's argmax
(Eq. 14), a step of ĵ·S_F reported as the additive ``fine`` term. Loss (Eq. 2):
L_S + λ_C·L_C + λ_F·L_F + λ_R·L_R on the normalised scale.

Explanation. The grades attend over the procedures (last decoder layer) and the
procedures over the clips (TFM), so grade g attends to clip t with
a_gt = Σ_p A^GPM_gp·A^TFM_pt, and w_t = Σ_g p_g·a_gt,
s_t = Σ_g p_g·a_gt·v_g / w_t give Σ_t w_t·s_t = Σ_g p_g·v_g, the coarse score.

Official checkpoints. The public code (ZhouKanglei/CoFInAl_AQA, models/model.py,
class ``cofinal``) is GDLT plus an ETF branch rather than the paper's modules,
and its parameter names are kept here (``in_proj``, ``transformer``,
``prototype``, ``regressor``, ``regressor_revert``, ``regi``, ``regressori``,
buffer ``etf_vec1``) so its state dicts load unchanged
(:func:`state_dict_from_official`, :func:`config_from_official`). Its forward,
available through the config switches:

* no procedure pooling (``n_procedures=0``);
* a second, "reverted" coarse head (``revert_head``): score
  (Σ p_g·v_g + 1 − Σ p'_g·v'_g)/2, which is again an expected value,
  Σ_k π_k·u_k with π = (p/2, p'/2) and u = (v, 1 − v'), so it decomposes the same
  way; the grade values are its "activation" constants (:func:`official_grade_values`);
* the fine feature ``regressori(regi(H_C))`` (``fine_head="official"``), a
  K-d vector for a K×K ETF, with K = 100 sub-grades of S_F = 1e-4 under
  S_C = 0.01 (labels ÷ 25, then ``(y·10000) // 100`` and ``% 100``).

Faults of that code not reproduced: ``regi`` is a MultiheadAttention without
``batch_first``, so in training its "sequence" was the batch and videos attended
to each other; at test time (batch 1) every grade attended only to itself. Here
it is batch-first and masked to self-attention only, which is the official
test-time computation at any batch size. Its argmax had no ``dim`` (right only
for batch 1); widths 256 and 4 were hard-coded where the fine width and grade
count belong (``fine_hidden``, ``n_grades``); nothing here is tied to CUDA, and
padded clips are masked out of every attention and average (BatchNorm's training
statistics still include them, as in GDLT: train on crops that need no padding).

Data: the paper trains on random crops of 68 (RG) / 124 (Fis-V) clips and tests
on the whole video (124–302 clips on Fis-V); any length works here. Dropout is
0.3 for RG and 0.7 for Fis-V (a preset setting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqa_cli.errors import AqaError
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

FINE_HEADS = ("paper", "official")


@dataclass
class CoFInAlConfig(HeadConfig):
    hidden_dim: int = 256  # D_S
    n_head: int = 1
    n_encoder: int = 1
    n_decoder: int = 2
    ffn_factor: int = 3  # FFN width = 3 × hidden, as in the official code
    n_grades: int = 4  # G
    n_procedures: int = 5  # P; 0 = the grades read the clips directly (official code)
    n_subgrades: int = 100  # K, the official ``score_len``
    coarse_step: float | None = None  # S_C on the [0, 1] scale; None = 1/G (the grades tile the range)
    grade_values: tuple[float, ...] | None = None  # v_g on the [0, 1] scale; None = g·S_C (Eq. 6)
    revert_head: bool = False  # the official second, reverted coarse head
    revert_values: tuple[float, ...] | None = None  # its values; None = grade_values reversed
    fine_head: str = "paper"  # "paper" (Eq. 10–11) or "official" (regi + regressori)
    fine_hidden: int = 256  # official fine head's inner width (hard-coded 256 there)
    fine_heads: int = 4  # official fine head's attention heads (hard-coded 4 there)
    etf_dim: int | None = None  # ETF rows; None = hidden_dim (paper) or n_subgrades (official)
    etf_seed: int = 0  # seed of the ETF's rotation U, so a config always gives the same frame
    lambda_c: float = 1.0
    lambda_f: float = 1.0
    lambda_r: float = 1.0
    # Weight of L_S. On a wide score scale (Fis-V TES 0–50) the score error on [0, 1] is small beside the
    # cross-entropy and ETF terms, as with GDLT's MSE; the presets say what cross-validation chose.
    mse_weight: float = 1.0

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists.
        if self.grade_values is not None:
            self.grade_values = tuple(float(v) for v in self.grade_values)
        if self.revert_values is not None:
            self.revert_values = tuple(float(v) for v in self.revert_values)
        problems = []
        if self.fine_head not in FINE_HEADS:
            problems.append(f"fine_head {self.fine_head!r} is not one of {', '.join(FINE_HEADS)}")
        if self.n_grades < 1 or self.n_subgrades < 2 or self.n_procedures < 0:
            problems.append("n_grades ≥ 1, n_subgrades ≥ 2 and n_procedures ≥ 0 are required")
        if self.hidden_dim % self.n_head or self.hidden_dim % self.fine_heads:
            problems.append(f"hidden_dim {self.hidden_dim} is not divisible by n_head / fine_heads")
        for name in ("grade_values", "revert_values"):
            values = getattr(self, name)
            if values is not None and len(values) != self.n_grades:
                problems.append(f"{name} has {len(values)} entries for {self.n_grades} grades")
        if self.coarse_step is not None and self.coarse_step <= 0:
            problems.append("coarse_step must be positive")
        if self.feature_dim < self.n_subgrades:
            problems.append(f"a simplex ETF of {self.n_subgrades} sub-grades needs ≥ {self.n_subgrades} "
                            f"dimensions, not {self.feature_dim}")
        if problems:
            raise AqaError(f"invalid CoFInAl settings: {'; '.join(problems)}")

    @property
    def feature_dim(self) -> int:
        """Dimension of the fine feature and rows of the ETF."""
        if self.etf_dim is not None:
            return self.etf_dim
        return self.hidden_dim if self.fine_head == "paper" else self.n_subgrades

    @property
    def step_coarse(self) -> float:
        return self.coarse_step if self.coarse_step is not None else 1.0 / self.n_grades

    @property
    def step_fine(self) -> float:
        return self.step_coarse / self.n_subgrades

    def values(self) -> tuple[list[float], list[float]]:
        """Grade values and reverted-head values on the [0, 1] scale."""
        values = list(self.grade_values) if self.grade_values is not None else \
            [g * self.step_coarse for g in range(self.n_grades)]
        revert = list(self.revert_values) if self.revert_values is not None else values[::-1]
        return values, revert


class ProcedureFusion(nn.Module):
    """TFM's procedure-aware attention (Eq. 7): P procedure features from T clips."""

    def __init__(self, dim: int, n_procedures: int):
        super().__init__()
        self.n_procedures = n_procedures
        self.query = nn.Linear(dim, n_procedures * dim)  # Q_T: P queries per clip
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D], mask [B, T] (True = real) → procedures [B, P, D], attention [B, P, T]."""
        b, _, d = x.shape
        real = mask.unsqueeze(-1).to(x.dtype)
        # avgPool over the clips of the per-clip queries; the query map is affine, so pooling the
        # clips first is the same and P times cheaper. Padded clips are left out of the average.
        pooled = (x * real).sum(dim=1) / real.sum(dim=1)
        q = self.query(pooled).view(b, self.n_procedures, d)
        # The key and value maps are affine and P ≪ T, so they are folded into the P queries and the P pooled
        # clips rather than applied to every clip: q·(W_k x + b_k) = (W_kᵀq)·x + q·b_k, whose last term is the
        # same for every clip and leaves the softmax unchanged; Σ_t a_t (W_v x_t + b_v) = W_v Σ_t a_t x_t + b_v,
        # the weights summing to 1. The same function, computed with 2·T·D² fewer multiply-adds.
        logits = (q @ self.key.weight) @ x.transpose(1, 2) / math.sqrt(d)
        attn = logits.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(dim=-1)
        return F.linear(attn @ x, self.value.weight, self.value.bias), attn


class CoFInAl(ProjectedClipsHead):
    name = "cofinal"
    config_class = CoFInAlConfig

    def __init__(self, config: CoFInAlConfig):
        super().__init__(config)
        c = config
        self.in_proj = ClipProjection(c.in_dim, c.hidden_dim)
        self.transformer = grade_transformer(c.hidden_dim, c.n_head, c.n_encoder, c.n_decoder,
                                             c.ffn_factor * c.hidden_dim, c.dropout)
        self.tfm = ProcedureFusion(c.hidden_dim, c.n_procedures) if c.n_procedures > 0 else None
        self.prototype = nn.Embedding(c.n_grades, c.hidden_dim)  # the grade prototypes G
        self.regressor = nn.Linear(c.hidden_dim, c.n_grades)
        self.regressor_revert = nn.Linear(c.hidden_dim, c.n_grades) if c.revert_head else None
        if c.fine_head == "official":
            # ModuleLists of one, as the official ``key_len = 1`` builds them, for its key names.
            self.regi = nn.ModuleList([nn.MultiheadAttention(c.hidden_dim, c.fine_heads, dropout=c.dropout,
                                                             batch_first=True)])
            self.regressori = nn.ModuleList([nn.Sequential(
                nn.Flatten(),
                nn.Linear(c.n_grades * c.hidden_dim, c.fine_hidden),
                nn.Linear(c.fine_hidden, c.feature_dim),
            )])
        else:
            self.regi = None
            self.regressori = None
        # Persistent, so a checkpoint carries its frame (official ones do), but never a parameter.
        self.register_buffer("etf_vec1", simplex_etf(c.feature_dim, c.n_subgrades, c.etf_seed))
        values, revert = c.values()
        self.register_buffer("grade_values", torch.tensor(values), persistent=False)
        self.register_buffer("revert_values", torch.tensor(revert), persistent=False)

    # ---------------------------------------------------------------------------------------- forward

    def forward_mapped(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        c = self.config
        mask = full_mask(x) if mask is None else mask.bool()
        pad = ~mask
        clips = self.transformer.encoder.forward_projected(x, src_key_padding_mask=pad)

        # TFM: procedures from clips (or, with P = 0, the clips themselves).
        if self.tfm is not None:
            memory, procedure_attn = self.tfm(clips, mask)
            memory_pad = None
        else:
            memory, procedure_attn, memory_pad = clips, None, pad

        # GPM: the grade prototypes read the memory; the last layer's cross-attention explains.
        h_c, grade_attn = decode_grades(self.transformer, self.prototype, memory, memory_pad)
        clip_attn = grade_attn if procedure_attn is None else grade_attn @ procedure_attn  # [B, G, T]

        # Coarse: the expected grade value under p (and the reverted head's, as a mixture).
        logits = torch.diagonal(self.regressor(h_c), dim1=-2, dim2=-1)  # [B, G]
        probs = sigmoid_normalised(logits)
        extras: dict[str, Tensor] = {"coarse_logits": logits}
        if self.regressor_revert is not None:
            logits_rev = torch.diagonal(self.regressor_revert(h_c), dim1=-2, dim2=-1)
            extras["coarse_logits_revert"] = logits_rev
            mix = torch.cat([probs, sigmoid_normalised(logits_rev)], dim=1) / 2
            values = torch.cat([self.grade_values, 1 - self.revert_values])
            attn = torch.cat([clip_attn, clip_attn], dim=1)
        else:
            mix, values, attn = probs, self.grade_values, clip_attn
        coarse = (mix * values).sum(dim=1)

        # Fine: nearest ETF column of the normalised fine feature (Eq. 14).
        h_f = self._fine_feature(h_c)
        h_bar = F.normalize(h_f, dim=-1)
        similarity = h_bar @ self.etf_vec1  # [B, K]
        subgrade = similarity.argmax(dim=1)
        fine = subgrade.to(coarse.dtype) * c.step_fine

        value_scores = self.denormalise(values)
        weights, clip_scores = attention_decomposition(mix, attn, value_scores, mask)
        extras.update({
            "grade_probs": mix,  # [B, G] (or [B, 2G] with the reverted head)
            "grade_values": value_scores.expand_as(mix),
            "coarse_score": self.denormalise(coarse),
            "subgrade": subgrade,
            "subgrade_similarity": similarity,
            "fine_feature": h_bar,
            "grade_attention": grade_attn,  # [B, G, P] (or [B, G, T] with P = 0)
            "clip_attention": clip_attn,  # [B, G, T]
            "embeddings": h_c,
        })
        if procedure_attn is not None:
            extras["procedure_attention"] = procedure_attn  # [B, P, T]
        return HeadOutput(score=self.denormalise(coarse + fine), weights=weights, clip_scores=clip_scores,
                          additive={"fine": fine * c.score_span}, extras=extras)

    def _fine_feature(self, h_c: Tensor) -> Tensor:
        if self.regressori is None:
            # Eq. 10–11: mask the grades by how strongly they respond, subtract the prototypes,
            # avgPool over the grades.
            m = h_c.mean(dim=-1).softmax(dim=1)  # [B, G]
            return (m.unsqueeze(-1) * (h_c - self.prototype.weight)).mean(dim=1)
        g = h_c.shape[1]
        # Each grade attends only to itself: the official test-time computation (see the module doc).
        only_self = ~torch.eye(g, dtype=torch.bool, device=h_c.device)
        z, _ = self.regi[0](h_c, h_c, h_c, attn_mask=only_self, need_weights=False)
        return self.regressori[0](z)

    # ------------------------------------------------------------------------------------------- loss

    def decompose_target(self, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. 6 on the normalised target: (grade index, coarse value n·S_C, sub-grade index)."""
        c = self.config
        y = (target.double() - c.score_min) / c.score_span
        # A score on a step boundary must not slip below it: 17.55 stored in float32 is 17.5499992,
        # a thousandth of a sub-grade short. The tolerance moves no score by more than that.
        tol = 1e-3
        grade = torch.floor(y / c.step_coarse + tol / c.n_subgrades).clamp_min(0)
        if c.grade_values is None:  # the grades tile [0, 1]: a perfect score sits in the last one
            grade = grade.clamp_max(c.n_grades - 1)
        coarse = grade * c.step_coarse
        sub = torch.floor((y - coarse) / c.step_fine + tol).clamp(0, c.n_subgrades - 1)
        return grade.long(), coarse.to(target.dtype), sub.long()

    def loss(self, out: HeadOutput, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        y = self.normalise(target)
        _, coarse_t, sub_t = self.decompose_target(target)
        # L_S (Eq. 1): the fine step is an argmax, so this trains the coarse expectation.
        l_s = 0.5 * (self.normalise(out.score) - y).pow(2).mean()
        # L_C: cross-entropy of the grade probabilities. The true coarse value is encoded on the
        # grade values (two-hot); with the paper's values v_g = g·S_C that is the one-hot grade.
        l_c = _soft_cross_entropy(out.extras["coarse_logits"], _two_hot(coarse_t, self.grade_values))
        if "coarse_logits_revert" in out.extras:
            l_c_rev = _soft_cross_entropy(out.extras["coarse_logits_revert"],
                                          _two_hot(1 - coarse_t, self.revert_values))
            l_c = (l_c + l_c_rev) / 2
        # L_F (Eq. 15): the fine feature towards its true sub-grade's ETF column.
        target_cols = self.etf_vec1[:, sub_t].T  # [B, d]
        l_f = 0.5 * ((out.extras["fine_feature"] * target_cols).sum(dim=-1) - 1).pow(2).mean()
        l_r = graph_regularisation(self.prototype.weight)
        total = c.mse_weight * l_s + c.lambda_c * l_c + c.lambda_f * l_f + c.lambda_r * l_r
        return total, {"score": float(l_s.detach()), "coarse": float(l_c.detach()),
                       "fine": float(l_f.detach()), "graph": float(l_r.detach())}


# --------------------------------------------------------------------------------------------- pieces

def simplex_etf(dim: int, n_classes: int, seed: int = 0) -> Tensor:
    """A simplex ETF E = √(K/(K−1))·U·(I_K − 1·1ᵀ/K), [dim, K] (Eq. 12).

    U [dim, K] has orthonormal columns: the Q factor of a uniform random matrix
    drawn with ``seed``, so the same arguments always give the same frame (the
    official code draws its U the same way, after seeding NumPy with 0).
    Columns have unit norm and pairwise inner products −1/(K−1) (Eq. 13).
    """
    if dim < n_classes:
        raise AqaError(f"a simplex ETF of {n_classes} classes needs at least {n_classes} dimensions, not {dim}")
    rng = np.random.RandomState(seed)
    u, _ = np.linalg.qr(rng.random_sample((dim, n_classes)))
    centring = np.eye(n_classes) - np.full((n_classes, n_classes), 1.0 / n_classes)
    return torch.from_numpy(math.sqrt(n_classes / (n_classes - 1)) * u @ centring).float()


def graph_regularisation(prototypes: Tensor) -> Tensor:
    """L_R (Eq. 8): KL between the grade distances |i − j| and the prototypes' angles.

    The paper does not say how the two matrices become distributions; each row,
    without its zero diagonal, is normalised to sum to 1, so only the relative
    geometry counts: grades further apart in quality should lie at
    proportionally wider angles. Returns KL(D‖angles) averaged over the rows.
    """
    g = prototypes.shape[0]
    if g < 3:  # with two grades both rows are (1) whatever the angle
        return prototypes.sum() * 0
    unit = F.normalize(prototypes, dim=-1)
    # arccos has an infinite slope at ±1: keep away from it (and from the zero diagonal).
    angle = torch.arccos((unit @ unit.T).clamp(-1 + 1e-6, 1 - 1e-6))
    idx = torch.arange(g, device=prototypes.device)
    dist = (idx.unsqueeze(0) - idx.unsqueeze(1)).abs().to(prototypes.dtype)
    off = ~torch.eye(g, dtype=torch.bool, device=prototypes.device)
    angle, dist = angle[off].view(g, g - 1), dist[off].view(g, g - 1)
    pred = angle / angle.sum(dim=1, keepdim=True)
    target = dist / dist.sum(dim=1, keepdim=True)
    return (target * (target.log() - pred.log())).sum(dim=1).mean()


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """−Σ_g t_g·log p_g with p the sigmoid-normalised probabilities, computed in log space."""
    log_s = F.logsigmoid(logits)
    log_p = log_s - torch.logsumexp(log_s, dim=1, keepdim=True)
    return -(target * log_p).sum(dim=1).mean()


def _two_hot(target: Tensor, values: Tensor) -> Tensor:
    """[B] values → [B, G] weights on the two grade values around each (clamped to their range)
    whose weighted mean is the value; duplicate values get the weight of one of them."""
    g = values.numel()
    if g == 1:
        return torch.ones(target.shape[0], 1, dtype=values.dtype, device=values.device)
    ordered, order = values.sort()
    t = target.to(values.dtype).clamp(ordered[0], ordered[-1]).contiguous()
    hi = torch.searchsorted(ordered, t).clamp(1, g - 1)
    lo = hi - 1
    gap = ordered[hi] - ordered[lo]
    w_hi = torch.where(gap > 0, (t - ordered[lo]) / gap.clamp_min(torch.finfo(gap.dtype).tiny), torch.ones_like(t))
    out = torch.zeros(t.shape[0], g, dtype=values.dtype, device=values.device)
    out.scatter_add_(1, order[lo].unsqueeze(1), (1 - w_hi).unsqueeze(1))
    out.scatter_add_(1, order[hi].unsqueeze(1), w_hi.unsqueeze(1))
    return out


# ------------------------------------------------------------------------------------- official checkpoints

def official_grade_values(activation: int, n_grades: int = 4) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Grade values of the official coarse and reverted heads for ``--activate_regular_restrictions``.

    They are plain tensors in the official model, not in its state dict, so the
    mode has to be named: 0 and 1 are evenly spaced (from 0 / from 1/G to 1), 2
    and 3 (the default) are fixed four-grade sets.
    """
    if activation == 0:
        values = torch.linspace(0, 1, n_grades)
        return tuple(values.tolist()), tuple(values.flip(0).tolist())
    if activation == 1:
        values = torch.linspace(0, 1, n_grades + 1)[1:]
        return tuple(values.tolist()), tuple(values.flip(0).tolist())
    if activation in (2, 3) and n_grades != 4:
        raise AqaError(f"official activation mode {activation} is defined for 4 grades, not {n_grades}")
    if activation == 2:
        return (0.1, 0.2, 0.8, 1.0), (1.0, 1.0, -1.0, -1.0)
    if activation == 3:
        return (-1.0, -0.8, 0.8, 1.0), (1.0, 0.8, -0.8, -1.0)
    raise AqaError(f"unknown official activation mode {activation}", fix="use 0, 1, 2 or 3")


def config_from_official(state: Mapping[str, Tensor], score_max: float = 25.0, *, activation: int = 3,
                         n_head: int = 1, dropout: float = 0.3) -> CoFInAlConfig:
    """Infer the architecture from an official state dict.

    Its labels were scores ÷ 25 (``datasets.py``), so ``score_max=25`` makes our
    score the official prediction × 25. What shapes cannot tell is an argument:
    the grade values' ``activation`` mode (default 3, as in ``options.py``) and
    the number of attention heads (1; the official Fis-V scripts pass 7).
    """
    state = state_dict_from_official(state)
    stem = official_stem_shapes(state)
    etf_dim, n_sub = state["etf_vec1"].shape
    official_fine = "regressori.0.1.weight" in state
    revert = "regressor_revert.weight" in state
    n_proc = state["tfm.query.weight"].shape[0] // stem["hidden_dim"] if "tfm.query.weight" in state else 0
    values, revert_values = official_grade_values(activation, stem["n_grades"])
    return CoFInAlConfig(
        **stem, n_head=n_head, n_procedures=n_proc, n_subgrades=n_sub,
        coarse_step=0.01, grade_values=values, revert_head=revert, revert_values=revert_values,
        fine_head="official" if official_fine else "paper",
        fine_hidden=state["regressori.0.1.weight"].shape[0] if official_fine else 256,
        etf_dim=etf_dim, score_min=0.0, score_max=score_max, dropout=dropout,
    )


__all__: Sequence[str] = ("CoFInAl", "CoFInAlConfig", "ProcedureFusion", "config_from_official",
                          "graph_regularisation", "official_grade_values", "simplex_etf",
                          "state_dict_from_official")
