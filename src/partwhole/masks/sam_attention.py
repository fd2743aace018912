"""SAM's image-encoder attention through ``F.scaled_dot_product_attention`` (SDPA).

Based on segment_anything's ``modeling.image_encoder.Attention`` (same weights,
same maths) and on the recipe of segment-anything-fast (PyTorch team): SAM's
decomposed relative-position bias (MViTv2) is an additive term of the attention
logits, so it can be handed to SDPA as its float ``attn_mask``. SDPA then picks
a fused kernel (memory-efficient attention on CUDA, a flash-style loop on CPU)
instead of materialising ``softmax(q k^T + bias)`` in separate ops.

Nothing of segment_anything is copied: :func:`set_attention` swaps the class of
every ``Attention`` module of an encoder to :class:`SDPAAttention`, a subclass
that overrides ``forward`` only, so parameters, state-dict keys, windowing and
checkpoints stay exactly SAM's, and the swap can be undone.
"""

from __future__ import annotations

from typing import Tuple

import torch
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn
from torch.nn import functional as F

from partwhole.common.errors import check_choice

ATTENTIONS = ("sdpa", "reference")


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, q_size: Tuple[int, int], k_size: Tuple[int, int]
) -> torch.Tensor:
    """SAM's ``add_decomposed_rel_pos`` term on its own, as an additive attention mask.

    Args:
        q: queries ``(b, n, h*w, c)`` (``n`` heads; unscaled, as SAM uses them).
        rel_pos_h, rel_pos_w: the learned tables ``(2*h-1, c)`` and ``(2*w-1, c)``.
        q_size, k_size: query and key grids ``(h, w)``.

    Returns:
        ``(b, n, qh*qw, kh*kw)``: ``bias[.., (i, j), (k, l)] = q_ij . Rh[i, k] + q_ij . Rw[j, l]``.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h)  # (qh, kh, c)
    r_w = get_rel_pos(q_w, k_w, rel_pos_w)  # (qw, kw, c)
    grid_q = q.unflatten(2, (q_h, q_w))  # (b, n, qh, qw, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, r_h)  # (b, n, qh, qw, kh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, r_w)  # (b, n, qh, qw, kw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (b, n, qh, qw, kh, kw)
    return bias.reshape(*q.shape[:2], q_h * q_w, k_h * k_w)


class SDPAAttention(Attention):
    """``segment_anything`` ``Attention`` whose forward runs through ``F.scaled_dot_product_attention``.

    Made by :func:`set_attention` (a class swap), never built directly: it
    has exactly the parameters of the module it replaces.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, h, w, d)`` tokens of one window (or the whole grid) -> ``(b, h, w, d)``."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, b, n, h*w, c)
        q, k, v = qkv.unbind(0)  # each (b, n, h*w, c)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)).to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (b, n, h*w, c)
        x = x.transpose(1, 2).reshape(b, h, w, -1)  # heads back into channels, as SAM orders them
        return self.proj(x)


def set_attention(module: nn.Module, attention: str) -> nn.Module:
    """Make every SAM image-encoder ``Attention`` inside ``module`` use ``attention``; returns ``module``.

    ``'sdpa'``: :class:`SDPAAttention`; ``'reference'``: segment_anything's own
    forward. In place, reversible, weights untouched. SAM's mask-decoder
    attention is another class and is left alone.
    """
    check_choice("attention", attention, ATTENTIONS)
    target = SDPAAttention if attention == "sdpa" else Attention
    for child in module.modules():
        if isinstance(child, Attention):
            child.__class__ = target
    return module


def attention_of(module: nn.Module) -> str | None:
    """``'sdpa'``, ``'reference'`` or ``None`` (no SAM encoder attention in ``module``; mixed raises)."""
    kinds = {"sdpa" if type(m) is SDPAAttention else "reference" for m in module.modules() if isinstance(m, Attention)}
    if len(kinds) > 1:
        raise ValueError("the encoder mixes SDPA and reference attention blocks; call set_attention on it")
    return kinds.pop() if kinds else None
