"""Transformer pieces the heads share, exposing the attention maps their explanations are made of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aqa_cli.heads import Head, HeadOutput, check_inputs


def attention_with_map(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                       key_padding_mask: Tensor | None = None,
                       attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``mha(query, key, value, need_weights=True)`` of a batch-first ``nn.MultiheadAttention``: (output [B, Q, d],
    the map averaged over heads [B, Q, T]), with the same arithmetic and the same dropout on the map.

    Computed batch-first, so each projection is one matrix product over contiguous rows. torch's own path turns
    the inputs sequence-first, and its key/value projection of a transposed [T, B, d] memory then runs as batched
    products over copies: that was 45% of GDLT's time when the effects run it on hundreds of clip-removed copies.
    Masks are boolean (True: may not attend), as the heads pass them.
    """
    standard = (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn
                and (attn_mask is None or attn_mask.dtype == torch.bool)
                and (key_padding_mask is None or key_padding_mask.dtype == torch.bool))
    if not standard:
        return mha(query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                   need_weights=True, average_attn_weights=True)
    b, nq, e = query.shape
    heads = mha.num_heads
    dh = e // heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    nk = key.shape[1]
    q = F.linear(query, w_q, b_q).view(b, nq, heads, dh).transpose(1, 2) * dh ** -0.5  # [B, heads, Q, dh]
    # Few queries over many keys (GDLT's grades reading every clip): the key and value projections of all T
    # keys cost more than the attention, so they are folded into the queries instead. q·(W_k m + b_k) =
    # (W_kᵀq)·m + q·b_k, whose last term is the same for every key and leaves the softmax unchanged; and
    # Σ_t a_t (W_v m_t + b_v) = W_v (Σ_t a_t m_t) + (Σ_t a_t)·b_v. The same function, in fewer multiply-adds
    # whenever Q·e + heads·Q·T < T·e (about 30× fewer for 4 grades on 300 clips).
    folded = key is value and nq * e + heads * nq * nk < nk * e
    if folded:
        logits = torch.einsum("bhqd,hde->bhqe", q, w_k.view(heads, dh, e)) @ key.unsqueeze(1).transpose(-2, -1)
    else:
        k = F.linear(key, w_k, b_k).view(b, nk, heads, dh).transpose(1, 2)
        logits = q @ k.transpose(-2, -1)  # [B, heads, Q, T]
    if attn_mask is not None:
        logits = logits.masked_fill(attn_mask, float("-inf"))
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    attn = F.dropout(logits.softmax(dim=-1), p=mha.dropout, training=mha.training)
    if folded:
        pooled = attn @ value.unsqueeze(1)  # [B, heads, Q, e]
        out = torch.einsum("bhqe,hde->bhqd", pooled, w_v.view(heads, dh, e))
        if b_v is not None:
            out = out + attn.sum(dim=-1, keepdim=True) * b_v.view(heads, 1, dh)
    else:
        v = F.linear(value, w_v, b_v).view(b, nk, heads, dh).transpose(1, 2)
        out = attn @ v
    return mha.out_proj(out.transpose(1, 2).reshape(b, nq, e)), attn.mean(dim=1)


def decoder_layer(layer: nn.TransformerDecoderLayer, tgt: Tensor, memory: Tensor,
                  memory_key_padding_mask: Tensor | None = None,
                  memory_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One post-norm ``nn.TransformerDecoderLayer`` step that also returns its attention maps.

    torch's own forward discards the maps; this recomputes the same layer from its
    submodules: (output [B, Q, d], self-attention [B, Q, Q], cross-attention [B, Q, T]),
    maps averaged over heads. Padded memory positions get zero cross-attention.
    """
    if layer.norm_first:
        raise ValueError("decoder_layer expects a post-norm layer (norm_first=False)")
    sa_out, sa_map = attention_with_map(layer.self_attn, tgt, tgt, tgt)
    x = layer.norm1(tgt + layer.dropout1(sa_out))
    ca_out, ca_map = attention_with_map(layer.multihead_attn, x, memory, memory,
                                        key_padding_mask=memory_key_padding_mask, attn_mask=memory_mask)
    x = layer.norm2(x + layer.dropout2(ca_out))
    ff = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
    x = layer.norm3(x + layer.dropout3(ff))
    return x, sa_map, ca_map


class ClipEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` of post-norm, batch-first layers, run batch-first throughout.

    Same modules and state dict, same arithmetic. torch runs a layer with an odd head count (GDLT's and CoFInAl's
    one head) outside its fused path: sequence-first, where the packed q/k/v projection of the transposed input
    becomes a batched product over a broadcast weight at about a sixth of the GEMM rate (a third of the time of
    the measured effects). Here each projection is one matrix product over contiguous rows, and attention is
    ``F.scaled_dot_product_attention`` with the padding as the same float mask torch builds.

    The first layer's q, k and v depend on each clip alone: :meth:`project_first` computes them beside the
    input and :meth:`forward_projected` takes it from there, so the measured effects (``Head.map_each_clip``)
    project each clip once per video rather than once per clip-removed copy.
    """

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        if mask is not None or is_causal or any(layer.norm_first or not layer.self_attn.batch_first
                                                for layer in self.layers):
            return super().forward(src, mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        return self.forward_projected(self.project_first(src), src_key_padding_mask)

    def project_first(self, x: Tensor) -> Tensor:
        """[B, T, e] → [B, T, 4e]: each clip's input beside the first layer's q, k, v of it (no layers: x)."""
        if not len(self.layers):
            return x
        mha = self.layers[0].self_attn
        return torch.cat([x, F.linear(x, mha.in_proj_weight, mha.in_proj_bias)], dim=-1)

    def forward_projected(self, projected: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        """The encoder from :meth:`project_first`'s output ([B, T, 4e]) and the padding (True: padded)."""
        if not len(self.layers):
            return projected if self.norm is None else self.norm(projected)
        e = projected.shape[-1] // 4
        x, qkv = projected[..., :e], projected[..., e:]
        attn_mask = None
        if src_key_padding_mask is not None:
            pad = src_key_padding_mask.bool()
            attn_mask = torch.zeros(pad.shape, dtype=x.dtype, device=x.device).masked_fill_(pad, float("-inf"))
            attn_mask = attn_mask[:, None, None, :]  # [B, 1, 1, T]: every head, every query
        for i, layer in enumerate(self.layers):
            mha = layer.self_attn
            if i:
                qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
            x = layer.norm1(x + layer.dropout1(_self_attention(mha, qkv, attn_mask)))
            x = layer.norm2(x + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))))
        return x if self.norm is None else self.norm(x)


def _self_attention(mha: nn.MultiheadAttention, qkv: Tensor, attn_mask: Tensor | None) -> Tensor:
    """Multi-head self-attention from the packed projection qkv [B, T, 3e], through the output projection."""
    b, t, e3 = qkv.shape
    heads = mha.num_heads
    q, k, v = qkv.reshape(b, t, 3, heads, e3 // (3 * heads)).permute(2, 0, 3, 1, 4)
    p = mha.dropout if mha.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # [B, heads, T, dh]
    return mha.out_proj(out.transpose(1, 2).reshape(b, t, e3 // 3))


class ProjectedClipsHead(Head):
    """A head that opens with a :class:`ClipProjection` (``in_proj``) and a :class:`ClipEncoder`
    (``transformer.encoder``): GDLT and CoFInAl. Both steps before the encoder's first attention read each clip
    alone, so they are the head's per-clip map (``Head.map_each_clip``); subclasses write ``forward_mapped``."""

    def forward(self, features: Tensor, mask: Tensor | None = None) -> HeadOutput:
        mask = check_inputs(features, mask, self.config.in_dim)
        return self.forward_mapped(self._map(features), mask)

    def _map(self, features: Tensor) -> Tensor:
        """The projection, and the encoder's first q, k, v of it: [B, T, 4·hidden]."""
        return self.transformer.encoder.project_first(self.in_proj(features))

    def map_each_clip(self, features: Tensor) -> Tensor | None:
        # The projection's BatchNorm uses its running statistics in eval mode: then each clip maps alone.
        return None if self.training else self._map(features)


def encoder(d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float) -> nn.TransformerEncoder:
    """A post-norm encoder stack with a final LayerNorm, as ``nn.Transformer`` builds it."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation=F.relu, batch_first=True)
    # Nested tensors would take a different numerical path for padded batches than for single videos.
    return ClipEncoder(layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)


class ClipProjection(nn.Sequential):
    """GDLT's input projection, Conv1d in → in/2 → hidden (kernel 1) with BatchNorm, which CoFInAl keeps:
    submodules ``0``, ``1``, ``3``, ``4`` as in both official repositories, so their state dicts load.

    Takes [B, T, in] and returns [B, T, hidden]. A kernel-1 convolution is a matrix product over the channels,
    and it runs as one here: torch's CPU Conv1d takes a slow unfolding path for it (half of GDLT's inference
    time at 200 clips, plus the transposes around it). BatchNorm sees the same B·T rows either way.
    """

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__(
            nn.Conv1d(in_dim, in_dim // 2, kernel_size=1),
            nn.BatchNorm1d(in_dim // 2),
            nn.ReLU(),
            nn.Conv1d(in_dim // 2, hidden_dim, kernel_size=1),
            nn.BatchNorm1d(hidden_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        conv1, norm1, _, conv2, norm2 = self
        b, t, _ = x.shape
        h = norm1(F.linear(x.reshape(b * t, -1), conv1.weight.squeeze(-1), conv1.bias)).relu()
        h = norm2(F.linear(h, conv2.weight.squeeze(-1), conv2.bias))
        return h.reshape(b, t, -1)


def grade_transformer(d_model: int, nhead: int, num_encoder: int, num_decoder: int, dim_feedforward: int,
                      dropout: float) -> nn.Module:
    """An encoder over the clips and a decoder for the grade queries, under the official ``transformer.encoder``
    / ``transformer.decoder`` names, Xavier-initialised as ``nn.Transformer`` does."""
    module = nn.Module()
    module.encoder = encoder(d_model, nhead, num_encoder, dim_feedforward, dropout)
    layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
    module.decoder = nn.TransformerDecoder(layer, num_decoder, norm=nn.LayerNorm(d_model))
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return module


def decode_grades(transformer: nn.Module, prototype: nn.Embedding, memory: Tensor,
                  memory_pad: Tensor | None) -> tuple[Tensor, Tensor]:
    """The grade prototypes read ``memory`` through the decoder of :func:`grade_transformer` (GDLT, and CoFInAl's
    GPM): the decoded grades [B, G, d] after the final norm, and the last layer's cross-attention [B, G, T],
    which the per-clip explanation is made of."""
    h = prototype.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
    cross = None
    for layer in transformer.decoder.layers:
        h, _, cross = decoder_layer(layer, h, memory, memory_pad)
    return transformer.decoder.norm(h), cross


def sigmoid_normalised(logits: Tensor) -> Tensor:
    """The official grade probabilities of GDLT and CoFInAl: σ(logit_g) / Σ_j σ(logit_j)."""
    s = torch.sigmoid(logits)
    return s / s.sum(dim=1, keepdim=True)


def official_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official GDLT or CoFInAl ``model.state_dict()`` (optionally saved from ``nn.DataParallel``)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def official_stem_shapes(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The sizes of the projection, transformer and prototypes that GDLT and CoFInAl share, read from an
    official state dict (after :func:`official_state_dict`), as config fields."""
    n_grades, hidden = state["prototype.weight"].shape
    ffn = state["transformer.encoder.layers.0.linear1.weight"].shape[0]
    return {
        "in_dim": state["in_proj.0.weight"].shape[1], "hidden_dim": hidden, "n_grades": n_grades,
        "n_encoder": len({k.split(".")[3] for k in state if k.startswith("transformer.encoder.layers.")}),
        "n_decoder": len({k.split(".")[3] for k in state if k.startswith("transformer.decoder.layers.")}),
        "ffn_factor": ffn // hidden,
    }
