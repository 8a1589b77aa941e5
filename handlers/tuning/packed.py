"""Attention for packed rows, example by example: causal SDPA per example instead of one masked block.

A packed row holds several whole examples (`data.pack`), each restarting its `position_ids` at 0. Given
only position ids, transformers builds a block-diagonal `seq x seq` mask and SDPA then computes (and
differentiates) every query against every key of the row, masked or not: on a 512-token row of ~50-token
chat examples that is ~10x the attention work the examples need, and a masked SDPA cannot use the
causal fast path.

Here the row's examples are gathered into a `(examples, longest, heads, head_dim)` batch per group of
similar lengths, run through `scaled_dot_product_attention(is_causal=True)` and scattered back. Right
padding inside a group is exact without a mask: a real query at position i only sees keys 0..i of its
own example, all real; the padded slots' outputs are dropped. The layout (`Segments`) is computed once
per forward from the position ids and passed down to every layer as a keyword argument; without it the
function is transformers' own SDPA attention, so eval, padded batches and generation are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION = "codetune_packed_sdpa"
GROUP_RATIO = 0.75  # an example joins the current group while its length >= 0.75 x the group's longest


@dataclass(frozen=True)
class Segments:
    """Where each example of a packed batch lies in the flattened `batch x seq` tokens."""

    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (gather index (n, L), kept slots (k,)) per group
    inverse: torch.Tensor  # flat token t is row inverse[t] of the groups' kept outputs, concatenated


def segments(position_ids: torch.Tensor, ratio: float = GROUP_RATIO) -> Segments:
    """Layout of the examples in `position_ids` (batch, seq): an example starts wherever a position is 0."""
    b, s = position_ids.shape
    flat = position_ids.reshape(-1).cpu()
    starts = torch.nonzero(flat == 0).squeeze(1).tolist()
    bounds = [*starts, b * s]
    spans = sorted(((bounds[i + 1] - bounds[i], bounds[i]) for i in range(len(starts))), reverse=True)
    groups: list[tuple[torch.Tensor, torch.Tensor]] = []
    order: list[torch.Tensor] = []
    i = 0
    while i < len(spans):
        longest = spans[i][0]
        j = i
        while j < len(spans) and spans[j][0] >= ratio * longest:
            j += 1
        lengths = torch.tensor([n for n, _ in spans[i:j]])
        first = torch.tensor([start for _, start in spans[i:j]])
        offs = torch.arange(longest)
        valid = offs[None, :] < lengths[:, None]
        index = first[:, None] + torch.where(valid, offs[None, :], 0)  # padded slots read the first token
        kept = torch.nonzero(valid.reshape(-1)).squeeze(1)
        groups.append((index.to(position_ids.device), kept.to(position_ids.device)))
        order.append(index.reshape(-1)[kept])
        i = j
    inverse = torch.empty(b * s, dtype=torch.long)
    inverse[torch.cat(order)] = torch.arange(b * s)
    return Segments(tuple(groups), inverse.to(position_ids.device))


def packed_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                segments: Segments | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, h, s, d = query.shape
    kv = key.shape[1]
    # one gather for q, k and v (and one scatter-add in backward), not three
    qkv = torch.cat((query, key, value), dim=1).transpose(1, 2).reshape(b * s, h + 2 * kv, d)
    outs = []
    for index, kept in segments.groups:
        n, length = index.shape
        g = qkv.index_select(0, index.reshape(-1)).view(n, length, h + 2 * kv, d).transpose(1, 2)
        qg, kg, vg = g.split((h, kv, kv), dim=1)
        if h != kv:
            kg, vg = kg.repeat_interleave(h // kv, dim=1), vg.repeat_interleave(h // kv, dim=1)
        o = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, is_causal=True, scale=scaling)
        outs.append(o.transpose(1, 2).reshape(n * length, h, d).index_select(0, kept))
    out = torch.cat(outs).index_select(0, segments.inverse)
    return out.view(b, s, h, d), None


def register() -> str:
    """Make `ATTENTION` a transformers attention implementation (its masks are SDPA's); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION
