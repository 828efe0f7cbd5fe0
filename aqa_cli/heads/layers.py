"""Transformer pieces the heads share, exposing the attention maps their explanations are made of."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
    sa_out, sa_map = layer.self_attn(tgt, tgt, tgt, need_weights=True, average_attn_weights=True)
    x = layer.norm1(tgt + layer.dropout1(sa_out))
    ca_out, ca_map = layer.multihead_attn(x, memory, memory, key_padding_mask=memory_key_padding_mask,
                                          attn_mask=memory_mask,
                                          need_weights=True, average_attn_weights=True)
    x = layer.norm2(x + layer.dropout2(ca_out))
    ff = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
    x = layer.norm3(x + layer.dropout3(ff))
    return x, sa_map, ca_map


def encoder(d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float) -> nn.TransformerEncoder:
    """A post-norm encoder stack with a final LayerNorm, as ``nn.Transformer`` builds it."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation=F.relu, batch_first=True)
    # Nested tensors would take a different numerical path for padded batches than for single videos.
    return nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)


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
