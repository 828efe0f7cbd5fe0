"""The clip-additive head: a score that is a sum over clips, so that its per-clip reasons are true.

Why this head exists. The papers' heads (GDLT, CoFInAl, interp) mix clips before
they score: an encoder or decoder lets every clip read every other one. Their
per-clip weights w_t and scores s_t still add up to the score, but they need not
say what clip t does to it: removing the clip a head weighs most may barely move
the score, and the real Fis-V heads' w·s ranks clips no better than chance
against the measured effect of removing them (faithfulness ≈ 0, see
``aqa_cli.effects``). On Fis-V that mixing buys no accuracy either: a linear
probe on mean-pooled features is as accurate held out.

So here clip t's weight and score are computed from clip t alone, or from a
bounded context of ±``context`` clips:

    h_t = GELU(W_in · standardise(x_t))            (then, with context k > 0,
    h_t ← h_t + DepthwiseConv_{2k+1}(h)_t          ±k clips of context)
    w_t = softmax_t(a · h_t),  s_t = min + span · sigmoid(b · h_t)
    S   = Σ_t w_t · s_t

With ``context = 0`` removing clip t leaves every other clip's logit and score
unchanged and only renormalises the softmax, so the score without clip t is
(S − w_t s_t) / (1 − w_t) exactly: the predicted effect w_t (s_t − S) / (1 − w_t)
*is* the effect, and faithfulness is 1 by construction. With context k > 0 only
the 2k neighbours of the removed clip change, so the explanation stays close to
true (measured, not assumed: ``aqa evaluate`` reports it).

A linear probe beside it (``probe_share`` α > 0): a ridge regression on the
video's mean clip feature, fitted in closed form after the training steps, its
strength chosen by exact leave-one-out error on the training videos. Being linear,
the probe is a mean of per-clip scores p_t, so the blend is clip-additive too:

    S = (1 − α) Σ_t w_t s_t + α · mean_t p_t

Removing clip t renormalises the softmax and the mean, and the score without
it is computed exactly in one pass. Its explanation (weights (1 − α) w_t + α/T,
scores the matching weighted mean) is the sum of two true ones, which the
faithfulness metric measures rather than assumes. Why: on Fis-V the probe alone
is as accurate as this head and averaging the two was more accurate than
either (weights/README.md).

Auxiliary targets (``aux_targets``: label columns such as PCS while learning TES,
or the deductions) share the trunk and the clip weights and are predicted as
Σ_t w_t · s^aux_t. They regularise the trunk; the reported score and its
explanation are the main target's alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqa_cli.errors import AqaError
from aqa_cli.heads import Head, HeadConfig, HeadOutput, check_inputs


@dataclass
class AdditiveConfig(HeadConfig):
    hidden_dim: int = 256
    # Clips of context on each side (depthwise convolution over time); 0 = each clip alone, exactly faithful.
    context: int = 0
    dropout: float = 0.5  # on the hidden clip embeddings
    # Channels of the standardised features dropped per video (the same channels for all of its clips): a
    # regulariser against leaning on a few of the 1024 channels, and ~50× cheaper on a CPU than element-wise
    # dropout over every clip's 1024 inputs (which took half of a training step).
    input_dropout: float = 0.0
    # Label columns learnt beside the target, through the same clip weights (joint TES + PCS, deductions).
    aux_targets: list[str] = field(default_factory=list)
    aux_weight: float = 0.5
    # Each auxiliary column's mean and std in the training labels (filled by prepare_config): its loss is on
    # the standardised value, so columns of any range weigh alike.
    aux_mean: list[float] = field(default_factory=list)
    aux_std: list[float] = field(default_factory=list)
    mse_weight: float = 1.0
    # The linear probe's share α of the score (0: no probe) and its ridge strength on standardised video means
    # (None: chosen by exact leave-one-out error among PROBE_ALPHAS on the training videos).
    probe_share: float = 0.0
    probe_alpha: float | None = None


PROBE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 25))


def ridge_on_video_means(x: np.ndarray, y: np.ndarray, alpha: float | None) -> tuple[np.ndarray, float, float]:
    """Ridge regression of y on the rows of x (video means [n, D]) after standardising each column: (weights on
    the raw columns, intercept, the strength used). With ``alpha`` None it is the one of least exact leave-one-out
    squared error (the hat-matrix shortcut through one SVD), so no video is held out to choose it."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    zc, yc = z - z.mean(0), y - y.mean()
    u, sv, vt = np.linalg.svd(zc, full_matrices=False)
    uy = u.T @ yc
    if alpha is None:
        best = np.inf
        for a in PROBE_ALPHAS:
            shrink = sv**2 / (sv**2 + a)
            hat = (u**2 * shrink).sum(1) + 1.0 / len(y)  # the intercept's leverage too
            err = float(np.mean(((yc - u @ (shrink * uy)) / (1.0 - hat)) ** 2))
            if err < best:
                best, alpha = err, a
    w = vt.T @ (sv / (sv**2 + alpha) * uy)  # on the standardised columns, whose training mean is 0
    w_raw = w / sd
    return w_raw, float(y.mean() - mu @ w_raw), float(alpha)


class AdditiveHead(Head):
    name = "additive"
    config_class = AdditiveConfig

    def __init__(self, config: AdditiveConfig):
        super().__init__(config)
        c = config
        if c.context < 0:
            raise ValueError(f"context must be ≥ 0, not {c.context}")
        if len(c.aux_mean) != len(c.aux_targets) or len(c.aux_std) != len(c.aux_targets):
            raise ValueError("aux_mean and aux_std need one value per auxiliary target (prepare_config fills them)")
        # Per-channel standardisation over real clips (running statistics at inference: still one clip at a time).
        self.in_norm = nn.BatchNorm1d(c.in_dim, affine=False)
        self.proj = nn.Linear(c.in_dim, c.hidden_dim)
        self.context_conv = (nn.Conv1d(c.hidden_dim, c.hidden_dim, 2 * c.context + 1, padding=c.context,
                                       groups=c.hidden_dim) if c.context else None)
        if self.context_conv is not None:
            nn.init.zeros_(self.context_conv.weight)  # starts as "each clip alone"; context is learnt on top
            nn.init.zeros_(self.context_conv.bias)
        self.out_drop = nn.Dropout(c.dropout)
        self.weight_out = nn.Linear(c.hidden_dim, 1)
        self.score_out = nn.Linear(c.hidden_dim, 1)
        self.aux_out = nn.Linear(c.hidden_dim, len(c.aux_targets)) if c.aux_targets else None
        if not 0.0 <= c.probe_share < 1.0:
            raise ValueError(f"probe_share must be in [0, 1), not {c.probe_share}")
        if c.probe_share > 0:
            # Buffers, not parameters: the probe is fitted in closed form (fit_closed_form), never by the optimiser.
            # Until it is fitted (probe_fitted 0) the head is the additive part alone, so training is unchanged.
            self.register_buffer("probe_weight", torch.zeros(c.in_dim))
            self.register_buffer("probe_bias", torch.zeros(()))
            self.register_buffer("probe_fitted", torch.zeros(()))

    # -- labels: the auxiliary columns

    @classmethod
    def label_columns(cls, config: AdditiveConfig) -> list[str]:
        return list(config.aux_targets)

    @classmethod
    def _aux_values(cls, config: AdditiveConfig, data) -> np.ndarray:  # noqa: ANN001 - a FeatureSet
        """The auxiliary columns as floats [videos, n_aux], refusing a missing column or a non-number by name."""
        lower = {c.lower(): c for c in data.aux}
        cols = []
        for name in config.aux_targets:
            col = lower.get(name.lower())
            if col is None:
                raise AqaError(f"auxiliary target {name!r} is not a column of the labels", path=data.labels_path,
                               fix=f"columns there: {', '.join(data.aux) or 'none'}; or drop it from aux_targets")
            try:
                values = np.array([float(v) for v in data.aux[col]], dtype=np.float64)
            except ValueError:
                raise AqaError(f"auxiliary target {col!r} holds a value that is not a number", path=data.labels_path,
                               fix="give numbers in every row of that column") from None
            if not np.isfinite(values).all():
                raise AqaError(f"auxiliary target {col!r} holds NaN or inf", path=data.labels_path,
                               fix="give finite numbers in every row of that column")
            cols.append(values)
        return np.stack(cols, axis=1) if cols else np.zeros((len(data), 0))

    @classmethod
    def prepare_config(cls, config: AdditiveConfig, data) -> AdditiveConfig:  # noqa: ANN001 - a FeatureSet
        if not config.aux_targets:
            return config
        values = cls._aux_values(config, data)
        if config.aux_mean and config.aux_std:
            return config  # completed already (fold models share the statistics of all videos)
        import dataclasses

        std = values.std(axis=0)
        return dataclasses.replace(config, aux_mean=[float(v) for v in values.mean(axis=0)],
                                   aux_std=[float(s) if s > 0 else 1.0 for s in std])

    def encode_labels(self, data) -> dict[str, Tensor] | None:  # noqa: ANN001 - a FeatureSet
        if not self.config.aux_targets:
            return None
        values = self._aux_values(self.config, data)
        mean, std = np.asarray(self.config.aux_mean), np.asarray(self.config.aux_std)
        return {"aux": torch.as_tensor((values - mean) / std, dtype=torch.float32)}

    # -- model

    def forward(self, features: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Features [B, T, D] with padding at the end (as every batch here is built) → HeadOutput."""
        mask = check_inputs(features, mask, self.config.in_dim)
        real = mask.unsqueeze(-1)
        # Only real clips enter the BatchNorm statistics; padding is zeroed (not multiplied), so nothing leaks.
        z = features.new_zeros(features.shape)
        z[mask] = self.in_norm(features[mask])
        if self.training and self.config.input_dropout > 0:
            keep = 1.0 - self.config.input_dropout
            z = z * (torch.rand(features.shape[0], 1, features.shape[2], device=z.device) < keep) / keep
        h = torch.where(real, F.gelu(self.proj(z)), z.new_zeros(()))
        if self.context_conv is not None:
            # Padding is zero context, as the video's edges are: a video scores the same alone or padded.
            h = h + self.context_conv(h.transpose(1, 2)).transpose(1, 2)
            h = torch.where(real, h, torch.zeros_like(h))
        h = self.out_drop(h)
        logits = self.weight_out(h).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        units = torch.sigmoid(self.score_out(h).squeeze(-1))
        clip_scores = self.denormalise(units) * mask
        extras: dict[str, Tensor] = {}
        if self.aux_out is not None:
            extras["aux"] = (weights.unsqueeze(-1) * self.aux_out(h)).sum(dim=1)  # standardised, [B, n_aux]
        if self._probe_on():
            # S = (1 − α) Σ w_t s_t + α mean_t p_t, written as one explanation: weights (1 − α) w_t + α/T and the
            # matching weighted mean of the two clip scores, which add up to S exactly.
            alpha = self.config.probe_share
            probe = (features @ self.probe_weight + self.probe_bias) * mask  # p_t, [B, T]
            uniform = mask / mask.sum(dim=1, keepdim=True)
            mixed = (1 - alpha) * weights + alpha * uniform
            numerator = (1 - alpha) * weights * clip_scores + alpha * uniform * probe
            extras["probe_clip_scores"], extras["additive_weights"] = probe, weights
            clip_scores = torch.where(mixed > 0, numerator / mixed.clamp_min(torch.finfo(mixed.dtype).tiny),
                                      torch.zeros_like(numerator))
            weights = mixed
        score = (weights * clip_scores).sum(dim=1)
        return HeadOutput(score=score, weights=weights, clip_scores=clip_scores, extras=extras)

    def _probe_on(self) -> bool:
        return self.config.probe_share > 0 and bool(self.probe_fitted)

    @torch.no_grad()
    def fit_closed_form(self, data) -> None:  # noqa: ANN001 - a FeatureSet
        """Fit the linear probe, if the config has one, on ``data``'s videos (their mean clip features)."""
        if self.config.probe_share <= 0:
            return
        means = np.stack([np.asarray(f, dtype=np.float64).mean(axis=0) for f in data.features])
        w, b, _alpha = ridge_on_video_means(means, np.asarray(data.targets, dtype=np.float64), self.config.probe_alpha)
        self.probe_weight.copy_(torch.as_tensor(w, dtype=self.probe_weight.dtype))
        self.probe_bias.fill_(b)
        self.probe_fitted.fill_(1.0)

    def scores_without_each_clip(self, features: Tensor) -> Tensor | None:
        """S(the video without clip t) for every t of one video [T, D], exactly, in one pass over its T clips.

        With no context, clip u's logit and score do not depend on the other clips (the standardisation uses the
        running statistics in eval mode), so dropping clip t leaves them and only renormalises the softmax:
        S_−t = Σ_{u≠t} e^{a_u}·s_u / Σ_{u≠t} e^{a_u}. This is the head's own function on the shortened video, not
        its explanation's claim; with context the neighbours change, and None sends the caller to the batched
        passes."""
        if self.context_conv is not None or self.training:
            return None
        h = F.gelu(self.proj(self.in_norm(features)))
        logits = self.weight_out(h).squeeze(-1).double()
        scores = self.denormalise(torch.sigmoid(self.score_out(h).squeeze(-1))).double()
        e = torch.exp(logits - logits.max())
        num, den = (e * scores).sum() - e * scores, e.sum() - e
        without = num / den
        if self._probe_on():
            probe = (features @ self.probe_weight + self.probe_bias).double()
            n = probe.shape[0]
            alpha = self.config.probe_share
            without = (1 - alpha) * without + alpha * (probe.sum() - probe) / (n - 1)
        return without.to(features.dtype)

    def loss(self, out: HeadOutput, target: Tensor, labels: dict[str, Tensor] | None = None
             ) -> tuple[Tensor, dict[str, float]]:
        mse = F.mse_loss(self.normalise(out.score), self.normalise(target))
        total = self.config.mse_weight * mse
        parts = {"mse": float(mse.detach())}
        if self.aux_out is not None and labels is not None:
            aux = F.mse_loss(out.extras["aux"], labels["aux"])
            total = total + self.config.aux_weight * aux
            parts["aux_mse"] = float(aux.detach())
        return total, parts

    def describe(self, out: HeadOutput, index: int = 0) -> dict:
        """The auxiliary predictions on their own scales (e.g. the PCS a TES head learnt beside it)."""
        if "aux" not in out.extras:
            return {}
        z = out.extras["aux"][index].double().cpu().numpy()
        values = z * np.asarray(self.config.aux_std) + np.asarray(self.config.aux_mean)
        return {"auxiliary": {name: float(v) for name, v in zip(self.config.aux_targets, values)}}
