"""Pose-guided AQA with exemplars: a transformer decoder reads the query's pose tokens against an exemplar's.

The design follows the pose-guided exemplar model of the course report in our
issue 6 (a decoder whose keys and values are an exemplar's tokens, regressing
the score *difference* to the exemplar, CoRe-style; a per-token step
classifier; a "no exemplar" baseline), with the changes its failure to converge
(ρ ≈ 0.05 on FineDiving) points to:

* **Small and pre-norm.** The report stacked 6 post-norm layers of 8 heads at
  Adam 1e-3 on a few thousand dives and the loss never fell. Here: 2 pre-norm
  layers, d = 128, 4 heads, AdamW 3e-4 with a cosine schedule (the preset).
* **Standardised inputs.** Pose features mix positions, velocities (tens of
  torso lengths per second) and presence fractions; the bank's per-channel mean
  and standard deviation are stored with the head and applied to every input.
* **No single summary token.** The report read the offset from one extra token
  ("quite rough", in its own words). Here every query token t predicts a
  difference d_t, and a readout attention (one learned query over the decoded
  tokens) weighs them: difference = Σ_t w_t·d_t. That is also the explanation.
* **Deterministic exemplars at test.** The report drew 10 exemplars at random
  and found its results depended on the draw. Here the K exemplars are fixed:
  the bank's entries at evenly spaced score quantiles, the same for every
  query, stored in the checkpoint with their scores and ids. Training pairs each
  query with a random bank entry other than itself (the seed fixes the draw).
* **Exemplars of the same dive.** A difference is easiest to judge between two
  performances of the same action (CoRe pairs dives of one dive number). With
  ``group_column`` (FineDiving: the dive number), the bank records each entry's
  group, is filled group by group (each group's share of the bank, at least one
  entry, spread over its scores), training pairs a query with an entry of its
  own group, and labelled inference (``aqa evaluate``, the folds of ``aqa
  train``) takes the K exemplars from the query's group, at its score
  quantiles (repeating entries when the group has fewer than K). A query whose
  group is unknown, or absent from the bank, and every query of ``aqa score``
  (no labels) gets the fixed K from the whole bank.

Score, with exemplar k's score e_k, weights w_kt and differences d_kt:

    score = mean_k (e_k + Σ_t w_kt·d_kt)

The explanation is exact with no additive term: w̄_t = mean_k w_kt (≥ 0,
summing to 1) and s_t = ē + mean_k(w_kt·d_kt) / w̄_t give Σ_t w̄_t·s_t = ē +
mean_k Σ_t w_kt·d_kt = score, since Σ_t w̄_t = 1. So s_t is the exemplars' mean
score plus what clip t adds to it, on the score scale. The direct variant
(``exemplars = false``) predicts s_t itself: score = Σ_t w_t·s_t.

**Difficulty.** With ``difficulty_column`` set and that column in the labels
(FineDiving's DD), the head learns the execution score, target ÷ DD, on
[execution_min, execution_max]; its forward pass gives execution scores (what
``aqa score`` shows, with no labels), and :meth:`apply_labels` multiplies them
by each video's DD where the labels give it (``aqa train`` folds, ``aqa
evaluate``).

**Steps, per frame.** With ``step_classes``, every frame is classified into a
step (FineDiving annotates its steps frame by frame). The input is one feature
per 32-frame clip, so the branch first rebuilds a frame sequence: frame f of
clip t is the decoded token of clip t, plus a learned embedding of f (where in
the clip it lies), plus a projection of the clip feature's *run* that holds f
(the pose feature is four 8-frame runs of mean positions and velocities, see
:mod:`aqa_cli.backbones.pose`: ``frame_runs`` × ``run_dim`` leading values). A
residual 1-D convolution over the whole frame sequence, across clip borders,
then places each step boundary. Why this can resolve single frames although
the evidence comes in 8-frame runs: a run's means are averages over its
frames, so a run straddling a boundary carries the fraction of its frames on
either side, and the frame embedding says which frames those are. The decoded
tokens are averaged over the K exemplars before this branch, so it runs once
per video, not K times.

Labels: a column (``steps``) of class names, separated by spaces, ``|``, ``,``
or ``;``, each optionally with a run length (``takeoff:9`` = 9 frames). A row
gives one name per frame of the clips (clips × 32), or of the whole timeline
at the recipe's frame rate (the leftover frames the recipe trims, split between
head and tail, are dropped the same way; a shorter last clip padded by the
recipe leaves its padding unlabelled), or one name per clip (all its frames).
Training must see whole sequences (``train_clips = 0``), so that frame i of
the label is frame i of the tokens.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqa_cli.backbones.pose import PER_SEGMENT, SEGMENTS
from aqa_cli.errors import AqaError
from aqa_cli.heads import Head, HeadConfig, HeadOutput, check_inputs

if TYPE_CHECKING:
    from aqa_cli.dataset import FeatureSet

MISSING = {"", "nan", "na", "n/a", "none", "null", "-"}


@dataclass
class PoseConfig(HeadConfig):
    in_dim: int = 837  # the pose backbone's clip feature
    hidden_dim: int = 128
    n_head: int = 4
    n_layers: int = 2
    ffn_factor: int = 2
    dropout: float = 0.1
    exemplars: bool = True  # False: the "no exemplar" baseline, direct regression
    k_exemplars: int = 10  # exemplars averaged over at inference
    # Exemplars kept in the checkpoint: at most this many training videos, spread evenly over the scores.
    bank_size: int = 256
    # Filled in from the training data (prepare_config): bank buffer sizes.
    bank_clips: int = 0
    bank_id_len: int = 0
    step_classes: list[str] = field(default_factory=list)  # empty: no step branch
    step_column: str = "steps"
    step_weight: float = 0.5
    clip_frames: int = 32  # frames per clip token: the step branch's output resolution
    # The clip feature's leading frame_runs × run_dim values are consecutive runs of frames (the pose backbone's
    # layout); 0 runs: the step branch sees only the decoded tokens.
    frame_runs: int = SEGMENTS
    run_dim: int = PER_SEGMENT
    frame_kernel: int = 9  # frames the step boundary convolution sees at once
    difficulty_column: str = ""  # e.g. "difficulty": learn target ÷ DD, give execution × DD
    execution_min: float = 0.0
    execution_max: float = 30.0
    difficulty_active: bool = False  # set by prepare_config when the training labels have the column
    group_column: str = ""  # e.g. "dive_type": exemplars of the query's own group (see the module notes)
    groups: list[str] = field(default_factory=list)  # the training labels' groups, set by prepare_config


def _find_column(aux: dict[str, list[str]], name: str) -> str | None:
    for col in aux:
        if col.lower() == name.lower():
            return col
    return None


def _difficulties(config: PoseConfig, data: FeatureSet) -> np.ndarray | None:
    """Each video's DD (NaN where the cell is empty), or None without the column."""
    if not config.difficulty_column:
        return None
    col = _find_column(data.aux, config.difficulty_column)
    if col is None:
        return None
    out = np.full(len(data), np.nan)
    for i, cell in enumerate(data.aux[col]):
        if cell.strip().lower() in MISSING:
            continue
        try:
            out[i] = float(cell)
        except ValueError:
            raise AqaError(f"difficulty {cell!r} of id {data.ids[i]!r} is not a number", path=data.labels_path,
                           fix=f"give a positive number in the {col} column, or leave it empty") from None
        if not out[i] > 0:
            raise AqaError(f"difficulty {cell!r} of id {data.ids[i]!r} is not positive", path=data.labels_path,
                           fix=f"give a positive number in the {col} column")
    return out


def _sinusoid(length: int, dim: int, device: torch.device) -> Tensor:
    """Fixed positions of the clip tokens: order matters in a pose sequence (take-off before entry)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


def _groups(config: PoseConfig, data: FeatureSet) -> np.ndarray | None:
    """Each video's group index in config.groups (-1: empty cell or a group the head never saw), or None
    without the column or without groups."""
    col = _find_column(data.aux, config.group_column) if config.group_column and config.groups else None
    if col is None:
        return None
    index = {g: k for k, g in enumerate(config.groups)}
    return np.array([index.get(cell.strip(), -1) for cell in data.aux[col]], dtype=np.int64)


def _bank_picks(scores: np.ndarray, groups: np.ndarray, size: int) -> np.ndarray:
    """At most ``size`` rows spread evenly over the score order, within each group in proportion to its share
    of the videos (every group at least one row)."""
    picks = []
    names, counts = np.unique(groups, return_counts=True)
    share = size * counts / counts.sum()
    quota = np.minimum(counts, np.maximum(1, np.floor(share))).astype(int)
    while quota.sum() > size and (quota > 1).any():
        quota[np.argmax(quota)] -= 1
    # Rows left over go to the groups that lost most to rounding down (largest remainder).
    for g in np.argsort(-(share - quota), kind="stable"):
        if quota.sum() >= size:
            break
        if quota[g] < counts[g]:
            quota[g] += 1
    for g, q in zip(names, quota):
        members = np.flatnonzero(groups == g)
        members = members[np.argsort(scores[members], kind="stable")]
        picks.append(members if len(members) <= q else members[np.round(np.linspace(0, len(members) - 1, q)).astype(int)])
    return np.concatenate(picks)[:size]


def _spread(rows: Tensor, scores: Tensor, k: int) -> Tensor:
    """k of ``rows`` at evenly spaced quantiles of their scores (with repeats when there are fewer than k)."""
    order = rows[torch.argsort(scores[rows], stable=True)]
    pos = ((torch.arange(k, dtype=torch.float64) + 0.5) * len(order) / k).floor().long()
    return order[pos.to(order.device)]


class PoseHead(Head):
    name = "pose"
    config_class = PoseConfig
    forward_reads_labels = True

    def __init__(self, config: PoseConfig):
        super().__init__(config)
        c = config
        if c.hidden_dim % c.n_head or c.hidden_dim % 2:
            raise AqaError("pose head: hidden_dim must be even and divisible by n_head", fix="fix the head's settings")
        if c.k_exemplars < 1 or c.bank_size < 1:
            raise AqaError("pose head: k_exemplars and bank_size must be ≥ 1", fix="fix the head's settings")
        if len(set(c.step_classes)) != len(c.step_classes) or len(c.step_classes) == 1:
            raise AqaError("pose head: step_classes must be empty or list at least two distinct names",
                           fix="e.g. step_classes = [\"takeoff\", \"flight\", \"entry\"]")
        if c.step_classes and (c.frame_runs < 0 or c.frame_runs * c.run_dim > c.in_dim or c.clip_frames < 1
                               or (c.frame_runs and c.clip_frames % c.frame_runs) or c.frame_kernel % 2 == 0):
            raise AqaError(f"pose head: frame_runs × run_dim ({c.frame_runs} × {c.run_dim}) must fit in in_dim "
                           f"({c.in_dim}) and divide clip_frames ({c.clip_frames}) into runs; frame_kernel must be odd",
                           fix="set frame_runs = 0 for features without runs of frames")
        self.embed = nn.Sequential(nn.Linear(c.in_dim, c.hidden_dim), nn.GELU(), nn.Dropout(c.dropout),
                                   nn.Linear(c.hidden_dim, c.hidden_dim))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(c.hidden_dim, c.n_head, c.ffn_factor * c.hidden_dim, c.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.hidden_dim)
        # The readout attention: one learned query scoring each decoded token (keys = this projection).
        self.readout = nn.Linear(c.hidden_dim, 1)
        self.delta = nn.Sequential(nn.Linear(c.hidden_dim, c.hidden_dim), nn.GELU(), nn.Linear(c.hidden_dim, 1))
        self.steps = _FrameSteps(c) if c.step_classes else None
        # Input standardisation, from the training data (set_bank); identity until then.
        self.register_buffer("feat_mean", torch.zeros(c.in_dim))
        self.register_buffer("feat_std", torch.ones(c.in_dim))
        if c.exemplars:
            n, length = c.bank_size, max(c.bank_clips, 1)
            self.register_buffer("bank_features", torch.zeros(n, length, c.in_dim))
            self.register_buffer("bank_mask", torch.zeros(n, length, dtype=torch.bool))
            self.register_buffer("bank_scores", torch.zeros(n))  # on [0, 1] of the head's own scale
            self.register_buffer("bank_valid", torch.zeros(n, dtype=torch.bool))
            self.register_buffer("bank_ids", torch.zeros(n, max(c.bank_id_len, 1), dtype=torch.uint8))
            self.register_buffer("bank_groups", torch.full((n,), -1, dtype=torch.long))

    # -- the label hooks (see aqa_cli.heads.Head)

    @classmethod
    def label_columns(cls, config: PoseConfig) -> list[str]:
        cols = []
        if config.step_classes:
            cols.append(config.step_column)
        if config.difficulty_column:
            cols.append(config.difficulty_column)
        if config.group_column:
            cols.append(config.group_column)
        return cols

    @classmethod
    def prepare_config(cls, config: PoseConfig, data: FeatureSet) -> PoseConfig:
        """Bank sizes and the difficulty mode from the training data; checks every label. Idempotent, so the
        folds of a cross-validation (subsets of what the first call saw) keep one config and can ship together."""
        changes: dict[str, Any] = {}
        if config.bank_clips == 0:
            changes["bank_size"] = max(1, min(config.bank_size, len(data)))
            changes["bank_clips"] = max(len(f) for f in data.features)
            changes["bank_id_len"] = max(len(i.encode()) for i in data.ids)
            dd = _difficulties(config, data)
            if dd is not None:
                changes.update(difficulty_active=True, score_min=config.execution_min, score_max=config.execution_max)
            col = _find_column(data.aux, config.group_column) if config.group_column else None
            if col is not None:
                changes["groups"] = sorted({c.strip() for c in data.aux[col] if c.strip().lower() not in MISSING})
        config = dataclasses.replace(config, **changes)
        if config.difficulty_active:
            dd = _difficulties(config, data)
            if dd is None or np.isnan(dd).any():
                where = "has no" if dd is None else f"has {int(np.isnan(dd).sum())} empty cell(s) in the"
                raise AqaError(f"the labels {where} {config.difficulty_column} column, which this pose head divides "
                               "the target by", path=data.labels_path,
                               fix=f"give every video its {config.difficulty_column}")
        if config.step_classes:
            _encode_steps(config, data)
        return config

    def encode_labels(self, data: FeatureSet) -> dict[str, Tensor]:
        """Step labels, DD, and (a side effect the training needs) the exemplar bank and the input statistics
        from this training data."""
        c = self.config
        labels: dict[str, Tensor] = {}
        dd = _difficulties(c, data) if c.difficulty_active else None
        if dd is not None:
            labels["difficulty"] = torch.as_tensor(dd, dtype=torch.float32)
        if c.step_classes:
            encoded = _encode_steps(c, data)
            if encoded is not None:
                labels["steps"], labels["step_clips"] = encoded
        scores = np.asarray(data.targets, dtype=np.float64) / (dd if dd is not None else 1.0)
        groups = _groups(c, data)
        rows = self.set_bank(data.features, scores, data.ids, source=str(data.labels_path), groups=groups)
        if c.exemplars:
            labels["bank_row"] = torch.as_tensor(rows)  # so that training never pairs a video with itself
            if groups is not None:
                labels["group"] = torch.as_tensor(groups)
        return labels

    def inference_labels(self, data: FeatureSet) -> dict[str, Tensor] | None:
        groups = _groups(self.config, data) if self.config.exemplars else None
        return None if groups is None else {"group": torch.as_tensor(groups)}

    def apply_labels(self, scores: np.ndarray, data: FeatureSet) -> np.ndarray:
        """Execution scores × DD when the head learnt execution; else unchanged."""
        if not self.config.difficulty_active:
            return scores
        dd = _difficulties(self.config, data)
        if dd is None or np.isnan(dd).any():
            raise AqaError(f"this pose head predicts execution scores and needs the {self.config.difficulty_column} "
                           f"column to give {data.target_name}", path=data.labels_path,
                           fix=f"add {self.config.difficulty_column} for every video")
        return scores * dd

    # -- the exemplar bank

    def set_bank(self, features: list[np.ndarray], scores: np.ndarray, ids: list[str], *, source: str = "",
                 groups: np.ndarray | None = None) -> np.ndarray:
        """Fill the bank from videos' clip features [T_i, D] and scores on the head's scale (at most bank_size,
        spread evenly over the score order, group by group when ``groups`` gives each video's group index), and
        set the input statistics from them. Returns each video's bank row (-1: not in the bank)."""
        c = self.config
        where = source or "the exemplar bank"
        for vid, f in zip(ids, features):
            if f.ndim != 2 or f.shape[1] != c.in_dim:
                raise AqaError(f"exemplar bank: video {vid!r} has features of shape {tuple(f.shape)} but the pose head "
                               f"expects [clips, {c.in_dim}]", path=where,
                               fix=f"extract every video with --backbone pose (or set in_dim = {f.shape[-1]})")
        if not len(features) or len(features) != len(scores) or len(ids) != len(scores):
            raise AqaError(f"exemplar bank: {len(features)} feature arrays, {len(scores)} scores, {len(ids)} ids",
                           path=where, fix="give one score and one id per video")
        stacked = np.concatenate(features).astype(np.float64)
        self.feat_mean.copy_(torch.as_tensor(stacked.mean(axis=0), dtype=torch.float32))
        # A constant channel (a landmark never seen) would divide by 0: its spread is taken as 1.
        std = stacked.std(axis=0)
        self.feat_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))
        placed = np.full(len(ids), -1, dtype=np.int64)
        if not c.exemplars:
            return placed
        n = self.bank_features.shape[0]
        pick = _bank_picks(np.asarray(scores, dtype=np.float64),
                           np.zeros(len(ids), dtype=np.int64) if groups is None else np.asarray(groups), n)
        self.bank_features.zero_()
        self.bank_mask.zero_()
        self.bank_scores.zero_()
        self.bank_valid.zero_()
        self.bank_ids.zero_()
        self.bank_groups.fill_(-1)
        length, id_len = self.bank_features.shape[1], self.bank_ids.shape[1]
        for row, j in enumerate(pick):
            f = np.array(features[j][:length], dtype=np.float32)  # longer than any training video: cut
            self.bank_features[row, :len(f)] = torch.from_numpy(f)
            self.bank_mask[row, :len(f)] = True
            self.bank_scores[row] = float((scores[j] - c.score_min) / c.score_span)
            self.bank_valid[row] = True
            raw = ids[j].encode()[:id_len]
            self.bank_ids[row, :len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
            self.bank_groups[row] = int(groups[j]) if groups is not None else -1
            placed[j] = row
        return placed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        # A bank whose feature size is not the head's would otherwise fail deep inside torch's copy.
        bank = state_dict.get(prefix + "bank_features")
        if bank is not None and bank.dim() == 3 and bank.shape[-1] != self.config.in_dim:
            raise AqaError(f"exemplar bank features are {bank.shape[-1]}-d but the pose head expects "
                           f"{self.config.in_dim}-d", fix="re-train the head on features of one backbone")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def exemplar_ids(self) -> list[str]:
        rows = torch.nonzero(self.bank_valid).flatten().tolist() if self.config.exemplars else []
        return [bytes(b for b in self.bank_ids[r].tolist() if b).decode(errors="replace") for r in rows]

    def inference_exemplars(self) -> Tensor:
        """The K bank rows used at inference: evenly spaced score quantiles of the valid entries (fixed)."""
        valid = torch.nonzero(self.bank_valid).flatten()
        if len(valid) == 0:
            raise AqaError("pose head: the exemplar bank is empty", fix="train the head (aqa train) before scoring")
        return _spread(valid, self.bank_scores, min(self.config.k_exemplars, len(valid)))

    def _exemplar_rows(self, b: int, labels: dict[str, Tensor] | None) -> Tensor:
        """Bank rows [B, K] for a batch: one random entry per query in training, K fixed ones at inference; of
        the query's own group where the labels give it and the bank holds it, never the query itself."""
        labels = labels or {}
        groups, own = labels.get("group"), labels.get("bank_row")
        valid = torch.nonzero(self.bank_valid).flatten()
        if len(valid) == 0:
            raise AqaError("pose head: the exemplar bank is empty", fix="train the head (aqa train) before scoring")
        if self.training:
            rows = []
            for i in range(b):
                pool = valid
                if groups is not None and int(groups[i]) >= 0:
                    same = valid[self.bank_groups[valid] == groups[i]]
                    pool = same if len(same) else valid
                if own is not None and int(own[i]) >= 0 and len(pool) > 1:
                    pool = pool[pool != own[i]]
                rows.append(pool[torch.randint(len(pool), (1,), device=valid.device)])
            return torch.cat(rows).unsqueeze(1)
        fixed = self.inference_exemplars()
        rows = fixed.unsqueeze(0).repeat(b, 1)
        if groups is not None:
            for i in range(b):
                same = valid[self.bank_groups[valid] == groups[i]] if int(groups[i]) >= 0 else valid[:0]
                if len(same):
                    rows[i] = _spread(same, self.bank_scores, rows.shape[1])
        return rows

    # -- model

    def _standardised(self, features: Tensor, mask: Tensor) -> Tensor:
        x = (features - self.feat_mean) / self.feat_std
        return x.masked_fill(~mask.unsqueeze(-1), 0.0)  # whatever padding holds (even NaN) cannot leak in

    def _tokens(self, features: Tensor, mask: Tensor) -> Tensor:
        x = self._standardised(features, mask)
        return self.embed(x) + _sinusoid(x.shape[1], self.config.hidden_dim, x.device)

    def forward(self, features: Tensor, mask: Tensor | None = None,
                labels: dict[str, Tensor] | None = None) -> HeadOutput:
        """``labels`` (optional, one row per video): ``group`` (index in config.groups, -1 unknown) chooses
        exemplars of the query's group; ``bank_row`` keeps a training query from being its own exemplar."""
        c = self.config
        mask = check_inputs(features, mask, c.in_dim)
        b, t = mask.shape
        q = self._tokens(features, mask)
        if c.exemplars:
            rows = self._exemplar_rows(b, labels)
            k = rows.shape[1]
            flat = rows.reshape(-1)
            memory = self._tokens(self.bank_features[flat], self.bank_mask[flat])
            memory_pad = ~self.bank_mask[flat]
            ex_scores = self.bank_scores[flat].view(b, k)
            tgt = q.repeat_interleave(k, dim=0)
            tgt_mask = mask.repeat_interleave(k, dim=0)
        else:
            k, rows = 1, None
            memory, memory_pad, tgt, tgt_mask = q, ~mask, q, mask
        h = tgt
        for layer in self.layers:
            h = layer(h, memory, tgt_key_padding_mask=~tgt_mask, memory_key_padding_mask=memory_pad)
        h = self.norm(h)
        attn = self.readout(h).squeeze(-1).masked_fill(~tgt_mask, float("-inf")).softmax(dim=-1)  # [B·K, T]
        delta = self.delta(h).squeeze(-1).masked_fill(~tgt_mask, 0.0)  # per-token difference, [0, 1] units
        attn, delta = attn.view(b, k, t), delta.view(b, k, t)
        w = attn.mean(dim=1)  # w̄_t
        contrib = (attn * delta).mean(dim=1)  # mean_k w_kt·d_kt
        extras: dict[str, Tensor] = {"readout_attention": attn}
        if c.exemplars:
            base = ex_scores.mean(dim=1)  # ē
            unit = base + contrib.sum(dim=1)
            clip_unit = base.unsqueeze(1) + torch.where(w > 0, contrib / w.clamp_min(torch.finfo(w.dtype).tiny),
                                                        torch.zeros_like(contrib))
            extras.update(exemplar_rows=rows, exemplar_scores=self.denormalise(ex_scores),
                          difference=(attn * delta).sum(dim=2) * c.score_span)
        else:
            unit = contrib.sum(dim=1)
            clip_unit = delta[:, 0]
        score = self.denormalise(unit)
        clip_scores = self.denormalise(clip_unit) * mask
        if self.steps is not None:
            logits = self.steps(h.view(b, k, t, -1).mean(dim=1), self._standardised(features, mask), mask)
            extras["step_logits"] = logits  # [B, T × clip_frames, classes]
            extras["step_probs"] = logits.softmax(dim=-1)
        extras["execution_scale"] = torch.full_like(score, float(c.difficulty_active))
        extras["mask"] = mask
        return HeadOutput(score=score, weights=w * mask, clip_scores=clip_scores, extras=extras)

    # -- loss

    def loss(self, out: HeadOutput, target: Tensor,
             labels: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
        labels = labels or {}
        c = self.config
        if c.difficulty_active:
            target = target / labels["difficulty"]
        # MSE of (ē + difference) against the target is the MSE of the difference against (target − ē).
        mse = F.mse_loss(self.normalise(out.score), self.normalise(target))
        total, parts = mse, {"mse": float(mse.detach())}
        steps = labels.get("steps")
        if steps is not None and "step_logits" in out.extras:
            logits, real = out.extras["step_logits"], out.extras["mask"]
            clips = labels["step_clips"]
            labelled = clips > 0
            # Labels name every frame of the whole video; a training crop shows only some, so they cannot line up.
            if bool((clips[labelled] != real.sum(dim=1)[labelled]).any()):
                raise AqaError("pose head: a video's step labels do not line up with the clips of its training crop",
                               fix="train on whole sequences: train_clips = 0 in the preset, or --set crop=0")
            n = logits.shape[1]
            steps = steps[:, :n] if steps.shape[1] >= n else F.pad(steps, (0, n - steps.shape[1]), value=-1)
            have = steps >= 0
            if bool(have.any()):
                ce = F.cross_entropy(logits[have], steps[have])
                total = total + c.step_weight * ce
                parts["steps"] = float(ce.detach())
        return total, parts

    # -- reading the outputs

    def describe(self, out: HeadOutput, index: int = 0) -> dict[str, Any]:
        c = self.config
        info: dict[str, Any] = {}
        if c.exemplars and "exemplar_rows" in out.extras:
            ids = self.bank_ids[out.extras["exemplar_rows"][index]]
            names = [bytes(x for x in row.tolist() if x).decode(errors="replace") for row in ids]
            info["exemplars"] = [{"id": n, "score": round(float(s), 4), "difference": round(float(d), 4)}
                                 for n, s, d in zip(names, out.extras["exemplar_scores"][index],
                                                    out.extras["difference"][index])]
            if c.groups:
                for entry, g in zip(info["exemplars"], self.bank_groups[out.extras["exemplar_rows"][index]].tolist()):
                    entry["group"] = c.groups[g] if g >= 0 else ""
            info["decomposition"] = ("score = mean over exemplars of (exemplar score + Σ_t w_t·d_t); each clip score "
                                     "is the exemplars' mean score plus that clip's difference contribution ÷ its "
                                     "weight, so Σ w·s equals the total exactly")
        elif c.exemplars:  # an ensemble of exemplar heads: each member read its own bank
            info["decomposition"] = ("the mean of several exemplar heads; each clip score is their weight-averaged "
                                     "clip score, so Σ w·s equals the total exactly")
        else:
            info["decomposition"] = "direct regression: Σ w·s equals the total exactly"
        if "step_probs" in out.extras:
            frames = int(out.extras["mask"][index].sum()) * c.clip_frames
            info["steps"] = step_runs(out.extras["step_probs"][index, :frames].argmax(dim=-1), c.step_classes)
        if c.difficulty_active:
            info["scale"] = (f"execution score (target ÷ {c.difficulty_column}); multiply by the dive's "
                             f"{c.difficulty_column} for the final score")
        return info


class _FrameSteps(nn.Module):
    """Per-frame step logits from the decoded clip tokens and the clip features' runs (see the module notes)."""

    def __init__(self, c: PoseConfig):
        super().__init__()
        self.clip_frames, self.runs, self.run_dim = c.clip_frames, c.frame_runs, c.run_dim
        self.frame_pos = nn.Parameter(torch.randn(c.clip_frames, c.hidden_dim) * 0.02)
        self.run_proj = nn.Linear(c.run_dim, c.hidden_dim) if c.frame_runs else None
        self.norm = nn.LayerNorm(c.hidden_dim)
        self.conv = nn.Conv1d(c.hidden_dim, c.hidden_dim, c.frame_kernel, padding=c.frame_kernel // 2)
        self.out = nn.Linear(c.hidden_dim, len(c.step_classes))

    def forward(self, tokens: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        """tokens [B, T, d] (decoded), x [B, T, in_dim] (standardised) → logits [B, T·clip_frames, classes]."""
        b, t, d = tokens.shape
        f = self.clip_frames
        z = tokens.unsqueeze(2) + self.frame_pos  # [B, T, F, d]
        if self.run_proj is not None:
            runs = self.run_proj(x[..., : self.runs * self.run_dim].reshape(b, t, self.runs, self.run_dim))
            z = z + runs.repeat_interleave(f // self.runs, dim=2)
        frame_mask = mask.repeat_interleave(f, dim=1)  # [B, T·F]
        z = z.reshape(b, t * f, d).masked_fill(~frame_mask.unsqueeze(-1), 0.0)
        z = z + self.conv(F.gelu(self.norm(z)).transpose(1, 2)).transpose(1, 2)
        return self.out(F.gelu(z))


def step_runs(frame_classes: Tensor, names: list[str]) -> list[dict[str, Any]]:
    """Per-frame class ids → runs of one step: {step, frame_start, frame_end (exclusive)}, frames counted from
    the first frame of the first clip."""
    ids = frame_classes.tolist()
    runs: list[dict[str, Any]] = []
    for i, k in enumerate(ids):
        if runs and runs[-1]["step"] == names[k]:
            runs[-1]["frame_end"] = i + 1
        else:
            runs.append({"step": names[k], "frame_start": i, "frame_end": i + 1})
    return runs


def _step_names(cell: str) -> list[str]:
    """'approach:20 takeoff:9 flight' → 20 × approach, 9 × takeoff, flight."""
    names: list[str] = []
    for token in re.split(r"[\s|,;]+", cell.strip()):
        if not token:
            continue
        name, sep, count = token.partition(":")
        if sep and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"{token!r} is not NAME or NAME:FRAMES")
        names += [name] * (int(count) if sep else 1)
    return names


def _align_steps(names: list[str], clips: int, frames: int) -> tuple[list[str], int] | None:
    """Fit a label row to a video's clips × frames: (per-frame names, frames of head to drop), or None."""
    span = clips * frames
    if len(names) == clips:  # one name per clip
        return [n for n in names for _ in range(frames)], 0
    if len(names) == span:
        return names, 0
    if span < len(names) < span + frames:  # the whole timeline, whose leftover the recipe trims head and tail
        head = (len(names) - span) // 2
        return names[head:head + span], head
    if span - frames < len(names) < span:  # the last clip padded by the recipe: its padding stays unlabelled
        return names, 0
    return None


def _encode_steps(config: PoseConfig, data: FeatureSet) -> tuple[Tensor, Tensor] | None:
    """(per-frame step class ids [videos, max clips × clip_frames] with -1 where unlabelled, clips per labelled
    video [videos] with 0 where unlabelled), or None without the column."""
    col = _find_column(data.aux, config.step_column)
    if col is None:
        return None
    lookup = {name.lower(): k for k, name in enumerate(config.step_classes)}
    f = config.clip_frames
    width = max(len(x) for x in data.features) * f
    out = torch.full((len(data), width), -1, dtype=torch.long)
    clips = torch.zeros(len(data), dtype=torch.long)
    for i, cell in enumerate(data.aux[col]):
        if cell.strip().lower() in MISSING:
            continue
        n = len(data.features[i])
        try:
            names = _step_names(cell)
        except ValueError as exc:
            raise AqaError(f"id {data.ids[i]!r}: step label {exc}", path=data.labels_path,
                           fix="write each step as NAME (one frame) or NAME:FRAMES, e.g. takeoff:9") from None
        aligned = _align_steps(names, n, f)
        if aligned is None:
            raise AqaError(f"id {data.ids[i]!r} has {len(names)} step label(s) for {n} clips", path=data.labels_path,
                           fix=f"give one {col} class per frame ({n * f} for {n} clips of {f}, or the whole "
                               f"timeline at the recipe's frame rate), or one per clip")
        for t, name in enumerate(aligned[0]):
            if name.lower() not in lookup:
                raise AqaError(f"id {data.ids[i]!r} has an unknown step {name!r} (known: "
                               f"{', '.join(config.step_classes)})", path=data.labels_path,
                               fix="use the head's step_classes, or add the class to them")
            out[i, t] = lookup[name.lower()]
        clips[i] = n
    return out, clips
