"""Interpretable weight–score head (Dong et al., "Interpretable Long-term Action Quality Assessment", BMVC 2024).

A DETR-style query decoder reads the clip features. There is one query per clip
position: a video of T clips is decoded with T queries (the crop length in
training, the video's own clip count at inference). Query t is a fixed content
vector plus the sinusoidal encoding of position t. The memory is the clip
features, standardised per channel and projected to the model width, with no
positional encoding: the variant the paper's ablation finds best on RG (0.824
against 0.751–0.778).

Each decoded query h_t goes through two MLPs: a weight MLP whose logits are
softmaxed over the video's queries (w_t ≥ 0, Σ_t w_t = 1) and a score MLP giving
a clip score s_t on the preset's scale. The prediction is Σ_t w_t·s_t, so the
explanation (which clips count, and how well each was done) is the model itself
rather than a reading of it.

Two pieces fight "temporal skipping", where the decoder bypasses its
self-attention and every query ends up with the same near-uniform output:

* query initialisation with a large spread: the query contents are drawn from
  N(0, query_std²) with query_std = 5 for Fis-V (2 for RG). The paper calls the
  value a "variance", but the official code passes it to ``init.normal_`` as the
  *standard deviation*, so it is a std here. With post-norm layers the raw
  queries enter the first self-attention un-normalised, so the spread makes
  its map peaked and the residual stream query-specific;
* the attention loss: for each decoder layer, KL(cross ‖ self) between the
  cross-attention map (query t over clips) and the self-attention map (query t
  over queries), both [T, T] since query t stands for clip t.

Query contents are drawn once, at construction, from a generator seeded with
``query_seed``, into a persistent buffer of ``max_queries`` rows (so checkpoints
carry them). They are not learned: the rows beyond the training crop are never
trained, and a fixed random draw keeps them exactly as "trained" as the others.
Position t uses row t mod ``max_queries`` (the sinusoidal encoding still tells
wrapped positions apart); the default of 512 rows covers 512 × 32 frames at
25 fps, about 11 minutes.

Differences from the official repository (github.com/dx199771/Interpretability-AQA),
each deliberate:

* it re-draws the queries with ``init.normal_`` at every forward pass, so its
  predictions, test ones included, are random; here they are drawn once;
* its attention loss compares softmaxed Gram matrices of the attention *outputs*;
  the paper describes a KL between the self- and cross-attention maps, which is
  what is done here (maps averaged over heads, read with ``decoder_layer``);
* it uses pre-norm layers (with a residual that drops the layer input), under which
  the query spread is erased by the first LayerNorm; here the layers are the
  standard post-norm ones, so the spread matters as the paper intends;
* it decodes with a fixed 136 queries over zero-padded memory without a mask;
  here each video is decoded with exactly its real clip count, so padding in a
  batch changes nothing;
* attention-weight dropout is off so the maps the KL compares are distributions
  (dropout stays on the residual branches and the feed-forward), and the rate is
  0.1 rather than 0.7 (see ``InterpConfig.dropout``);
* the features are standardised per channel (BatchNorm over the real clips) before
  the projection; the official feeds them raw (see ``InterpHead.__init__``);
* it adds N(0, 0.05²) noise to the predictions inside the MSE (``dino_loss``), which
  only adds gradient noise; not done here;
* d_model: the official 1024 is kept when ``hidden_dim == in_dim``; the default
  projects the features to 256 with one linear layer so that a Fis-V training
  run fits a 2-core CPU (see ``InterpConfig.hidden_dim``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqa_cli.heads import Head, HeadConfig, HeadOutput, check_inputs, full_mask
from aqa_cli.heads.layers import decoder_layer


@dataclass
class InterpConfig(HeadConfig):
    # 256 rather than the paper's 1024. One Fis-V training epoch (400 videos, 124-clip crops, batch 32, one CPU
    # thread, forward + loss + backward + Adam) measured 10.8–12.8 s at 256 against 56–59 s at 1024 on the
    # shared 2-core development machine. The official schedule does its useful work in ~60 epochs (the rate is
    # 1e-6 after that), which is ~11 min at 256 but ~1 h at 1024: over the 20-minute budget. hidden_dim = in_dim
    # (1024) gives the published width, the (standardised) features then entering the decoder unprojected.
    hidden_dim: int = 256
    n_head: int = 4  # official H=4
    n_decoder: int = 2  # official num_layers=2 (Fis-V and RG)
    ffn_dim: int = 1024  # official dim_feedforward=1024
    # The official decoder uses 0.7. With post-norm layers and std-5 queries that opens a large train/eval gap:
    # on a 320/80 Fis-V TES hold-out (12 epochs) eval predictions sat ~33 points off (val MSE ≈ 1100) at 0.7
    # and ~5 off (≈ 65) at 0.3, against ≈ 40 at 0.1, with similar rank correlation (0.47–0.49).
    dropout: float = 0.1
    query_std: float = 5.0  # Fis-V 5, RG 2: the paper's "query variance", used as a std by the official code
    query_seed: int = 0  # the query contents are a fixed draw from this seed
    max_queries: int = 512  # rows of query content; position t uses row t mod max_queries
    # λ of the attention KL. The official adds its KL with weight 1 but summed over batch and map entries; here
    # it is a mean over query rows (summed over layers), so the weight does not depend on batch size or length.
    attention_weight: float = 1.0
    # Which clips query t may read: None = every clip (the paper), w = only clips t−w … t+w. The paper's query t
    # is tied to clip t by its position encoding alone, and nothing makes it read clip t, so its weight and score
    # need not be about that clip (tests/test_heads.py: a planted fall got the lowest clip score in 11% of
    # videos, chance 12.5%). With w = 0 the cross-attention is the identity, the attention loss then pulls the
    # self-attention to it too, and clip t's weight and score are about clip t: the fall is found in every video.
    local_window: int | None = None
    # Weight of the score MSE on [0, 1]; the presets say what cross-validation chose (cf. GDLT's mse_weight).
    mse_weight: float = 1.0


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """The transformer's sine/cosine encoding [length, dim] (sin on even, cos on odd channels)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return pe.to(dtype)


def attention_kl(self_maps: Tensor, cross_maps: Tensor, row_mask: Tensor | None = None) -> Tensor:
    """Σ over layers of the mean over real query rows of KL(cross_t ‖ self_t).

    self_maps, cross_maps: [B, L, Q, K], each real row a distribution over its K keys (padded keys hold 0).
    row_mask [B, Q]: True for rows to average over (all when None). The direction follows the official code
    (``kl_div(log self, cross)``): the cross-attention map is the target the self-attention map is pulled to,
    and gradients reach both. Entries where the cross map is 0 contribute nothing; the self map is floored at
    the smallest normal float so a zero there gives a large, finite penalty.
    """
    if self_maps.shape != cross_maps.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(self_maps.shape)} vs {tuple(cross_maps.shape)}")
    tiny = torch.finfo(cross_maps.dtype).tiny
    # Both logs are floored so that neither branch of the where() produces inf/NaN gradients.
    terms = cross_maps * (cross_maps.clamp_min(tiny).log() - self_maps.clamp_min(tiny).log())
    rows = torch.where(cross_maps > 0, terms, torch.zeros_like(terms)).sum(dim=-1)  # [B, L, Q]
    if row_mask is None:
        row_mask = torch.ones(rows.shape[0], rows.shape[2], dtype=torch.bool, device=rows.device)
    m = row_mask.to(rows.dtype).unsqueeze(1)  # [B, 1, Q]
    per_layer = (rows * m).sum(dim=(0, 2)) / m.sum().clamp_min(1.0)  # [L]
    return per_layer.sum()


def _mlp(dim: int) -> nn.Sequential:
    # The official evaluator's shape, 1024 → 512 → 256 → 1 with ReLU, scaled to the model width.
    return nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim // 4), nn.ReLU(),
                         nn.Linear(dim // 4, 1))


class InterpHead(Head):
    name = "interp"
    config_class = InterpConfig

    def __init__(self, config: InterpConfig):
        super().__init__(config)
        c = config
        if c.hidden_dim % c.n_head:
            raise ValueError(f"hidden_dim {c.hidden_dim} is not divisible by n_head {c.n_head}")
        if c.max_queries < 1 or c.query_std <= 0:
            raise ValueError("max_queries and query_std must be positive")
        if c.local_window is not None and c.local_window < 0:
            raise ValueError(f"local_window must be None or ≥ 0, not {c.local_window}")
        # Per-channel standardisation of the features before anything else. Video Swin features carry a large
        # per-channel offset (std of the channel means ≈ 0.7) over a small video-to-video spread (≈ 0.36);
        # without it the decoder barely sees the video within a CPU-sized training run.
        self.in_norm = nn.BatchNorm1d(c.in_dim)
        self.in_proj: nn.Module = nn.Identity() if c.hidden_dim == c.in_dim else nn.Linear(c.in_dim, c.hidden_dim)
        self.decoder = nn.ModuleList()
        for _ in range(c.n_decoder):
            layer = nn.TransformerDecoderLayer(c.hidden_dim, c.n_head, c.ffn_dim, c.dropout, batch_first=True)
            # No dropout on the attention weights: the maps feed the KL and the explanation as distributions.
            layer.self_attn.dropout = 0.0
            layer.multihead_attn.dropout = 0.0
            self.decoder.append(layer)
        for p in self.decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # Drawn once from its own generator, so the draw depends on query_seed alone (not on what was built
        # before), and kept as a buffer so checkpoints carry it.
        gen = torch.Generator().manual_seed(c.query_seed)
        self.register_buffer("query_content", torch.randn(c.max_queries, c.hidden_dim, generator=gen) * c.query_std)
        self.weight_mlp = _mlp(c.hidden_dim)
        self.score_mlp = _mlp(c.hidden_dim)

    def queries(self, length: int) -> Tensor:
        """The T = ``length`` initial queries [T, d]: content row t mod max_queries plus the encoding of t."""
        rows = torch.arange(length, device=self.query_content.device) % self.config.max_queries
        content = self.query_content[rows]
        return content + sinusoidal_positions(length, content.shape[-1], content.device, content.dtype)

    def _decode(self, memory: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Decode videos that all have T real clips: memory [b, T, d] → weights, unit scores, maps, embeddings."""
        b, length, _ = memory.shape
        q = self.queries(length).unsqueeze(0).expand(b, -1, -1)
        self_maps, cross_maps = [], []
        outside = None  # True where query t may not read clip τ
        if self.config.local_window is not None:
            pos = torch.arange(length, device=memory.device)
            outside = (pos[:, None] - pos[None, :]).abs() > self.config.local_window
        for layer in self.decoder:
            q, sa, ca = decoder_layer(layer, q, memory, memory_mask=outside)
            self_maps.append(sa)
            cross_maps.append(ca)
        weights = torch.softmax(self.weight_mlp(q).squeeze(-1), dim=1)
        units = self.score_mlp(q).squeeze(-1)
        return weights, units, torch.stack(self_maps, 1), torch.stack(cross_maps, 1), q

    def forward(self, features: Tensor, mask: Tensor | None = None) -> HeadOutput:
        mask = check_inputs(features, mask, self.config.in_dim)
        return self._forward(features, mask, mapped=False)

    def map_each_clip(self, features: Tensor) -> Tensor | None:
        # In eval mode the input BatchNorm uses its running statistics: then each clip maps alone.
        if self.training:
            return None
        b, t, d = features.shape
        return self.in_proj(self.in_norm(features.reshape(b * t, d))).reshape(b, t, -1)

    def forward_mapped(self, mapped: Tensor, mask: Tensor | None = None) -> HeadOutput:
        return self._forward(mapped, full_mask(mapped) if mask is None else mask.bool(), mapped=True)

    def _forward(self, features: Tensor, mask: Tensor, *, mapped: bool) -> HeadOutput:
        batch, length, _ = features.shape
        n_layers, d = len(self.decoder), self.config.hidden_dim
        # Real clips first, in their order: clip t of a video is its t-th real clip, whatever the padding.
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices
        compact_mask = mask.gather(1, order)
        # Only real clips go through the input layers, so padding never enters the BatchNorm statistics.
        real = features.gather(1, order.unsqueeze(-1).expand_as(features))[compact_mask]
        if not mapped:
            real = self.in_proj(self.in_norm(real))
        memory = real.new_zeros(batch, length, real.shape[-1])
        memory[compact_mask] = real
        lengths = mask.sum(dim=1)

        weights = memory.new_zeros(batch, length)
        units = memory.new_zeros(batch, length)
        self_maps = memory.new_zeros(batch, n_layers, length, length)
        cross_maps = memory.new_zeros(batch, n_layers, length, length)
        embeddings = memory.new_zeros(batch, length, d)
        # One decoder pass per distinct clip count, each video with exactly its own number of queries: padded
        # queries never enter self-attention, so a video scores the same alone or in any padded batch.
        for n in lengths.unique().tolist():
            rows = (lengths == n).nonzero().squeeze(1)
            w, u, sa, ca, emb = self._decode(memory[rows, :n])
            weights[rows, :n] = w
            units[rows, :n] = u
            self_maps[rows, :, :n, :n] = sa
            cross_maps[rows, :, :n, :n] = ca
            embeddings[rows, :n] = emb

        # Back from "real clips first" to the input's positions (an identity for end-padded batches).
        inv = torch.argsort(order, dim=1)
        weights, units, embeddings = (x.gather(1, inv.view(batch, length, *([1] * (x.dim() - 2))).expand_as(x))
                                      for x in (weights, units, embeddings))
        inv_rows = inv.view(batch, 1, length, 1).expand(-1, n_layers, -1, length)
        inv_cols = inv.view(batch, 1, 1, length).expand(-1, n_layers, length, -1)
        self_maps = self_maps.gather(2, inv_rows).gather(3, inv_cols)
        cross_maps = cross_maps.gather(2, inv_rows).gather(3, inv_cols)

        clip_scores = self.denormalise(units) * mask
        score = (weights * clip_scores).sum(dim=1)
        return HeadOutput(score=score, weights=weights, clip_scores=clip_scores,
                          extras={"self_attention": self_maps, "cross_attention": cross_maps,
                                  "embeddings": embeddings, "mask": mask})

    def loss(self, out: HeadOutput, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        mse = F.mse_loss(self.normalise(out.score), self.normalise(target))
        att = attention_kl(out.extras["self_attention"], out.extras["cross_attention"], out.extras["mask"])
        total = self.config.mse_weight * mse + self.config.attention_weight * att
        return total, {"mse": float(mse.detach()), "attention_kl": float(att.detach())}
