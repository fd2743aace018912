"""Baseline: the reference Agglomerator's forward maths, written plainly.

This restates, in our own code, how `distill-part-whole` (src/models.py) computes
a forward pass: ``b n l d`` layout, ``Rearrange`` to ``b (l d) n`` around every
column net, grouped ``Conv1d``, einsum consensus attention, flips, padding and a
``stack(...).sum`` per iteration, fp32 and eager. Parameter names equal
:class:`partwhole.agglomerator.model.Agglomerator`, so one state dict loads into both.

Used as the baseline of ``bench/train_throughput.py`` and by the test that shows
our model computes the same function (``tests/test_model.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn

from partwhole.agglomerator.model import (
    TOKEN_ATTEND_SELF_VALUE,
    AgglomeratorConfig,
    ConvTokenizer,
    Sine,
)


class ReferenceColumnNet(nn.Module):
    def __init__(self, dim, groups, num_patches, mult=4, hidden_layers=1, out_dim=None, activation=nn.GELU):
        super().__init__()
        widths = [dim] + [dim * mult] * hidden_layers + [out_dim or dim]
        layers = [Rearrange("b n l d -> b (l d) n")]
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(activation())
            layers += [nn.LayerNorm(num_patches), nn.Conv1d(w_in * groups, w_out * groups, 1, groups=groups)]
        layers.append(Rearrange("b (l d) n -> b n l d", l=groups))
        self.net = nn.Sequential(*layers)

    def forward(self, levels):
        return self.net(levels)


def reference_consensus(levels, attend_self=False):
    _, n, _, d = levels.shape
    q, k, v = levels, F.normalize(levels, dim=-1), levels
    sim = torch.einsum("b i l d, b j l d -> b l i j", q, k) * (d**-0.5)
    if not attend_self:
        self_mask = torch.eye(n, device=levels.device, dtype=torch.bool)
        sim = sim.masked_fill(self_mask, TOKEN_ATTEND_SELF_VALUE)
    attn = sim.softmax(dim=-1)
    return torch.einsum("b l i j, b j l d -> b i l d", attn, v)


class ReferenceAgglomerator(nn.Module):
    def __init__(self, config: AgglomeratorConfig):
        super().__init__()
        c = self.config = config
        n, d = c.num_patches, c.patch_dim
        self.wl = nn.Parameter(torch.tensor(0.25))
        self.wBU = nn.Parameter(torch.tensor(0.25))
        self.wTD = nn.Parameter(torch.tensor(0.25))
        self.wA = nn.Parameter(torch.tensor(0.25))
        self.image_to_tokens = nn.Sequential(
            ConvTokenizer(c.n_channels, d // c.patch_size**2),
            Rearrange("b d (h p1) (w p2) -> b (h w) (d p1 p2)", p1=c.patch_size, p2=c.patch_size),
        )
        self.classification_head_from_last_level = nn.Sequential(
            nn.LayerNorm(d), nn.Dropout(0.5), Rearrange("b n d -> b (n d)"),
            nn.LayerNorm(n * d), nn.Dropout(0.5), nn.Linear(n * d, c.n_classes),
        )
        self.init_levels = nn.Parameter(torch.randn(c.levels, d))
        self.bottom_up = ReferenceColumnNet(d, c.levels, n, activation=nn.GELU)
        self.top_down = ReferenceColumnNet(d, c.levels - 1, n, activation=Sine)
        if c.levels_encoder:
            self.levels_encoder = ReferenceColumnNet(d, c.levels, n, hidden_layers=3, out_dim=c.levels_encoder_dim)

    def forward(self, img):
        c = self.config
        b = img.shape[0]
        tokens = self.image_to_tokens(img)
        n = tokens.shape[1]
        bottom_level = rearrange(tokens, "b n d -> b n () d")
        levels = repeat(self.init_levels, "l d -> b n l d", b=b, n=n)
        hiddens = [levels]
        num_contributions = torch.empty(c.levels, device=img.device).fill_(4)
        num_contributions[-1] = 3
        for _ in range(c.num_iters):
            levels_with_input = torch.cat((bottom_level, levels), dim=-2)
            bottom_up_out = self.bottom_up(levels_with_input[..., :-1, :])
            top_down_out = self.top_down(torch.flip(levels_with_input[..., 2:, :], [2]))
            top_down_out = F.pad(torch.flip(top_down_out, [2]), (0, 0, 0, 1), value=0.0)
            consensus = reference_consensus(levels)
            levels_sum = torch.stack(
                (levels * self.wl, bottom_up_out * self.wBU, top_down_out * self.wTD, consensus * self.wA)
            ).sum(dim=0)
            levels = levels_sum / rearrange(num_contributions, "l -> () () l ()")
            hiddens.append(levels)
        all_levels = torch.stack(hiddens)
        top_level = F.normalize(all_levels[c.denoise_iter, :, :, -1], dim=1)
        encoded = self.levels_encoder(all_levels[-1]) if c.levels_encoder else all_levels[-1]
        return top_level, all_levels[-1], encoded


def reference_levels_loss(encoded, embeds):
    """The reference's per-level MSE with weights 0.1 / 0.2 / 0.7 for levels 0 / 1 / 2."""
    return (
        0.7 * torch.mean((encoded[:, :, 2] - embeds[:, :, 2]) ** 2)
        + 0.2 * torch.mean((encoded[:, :, 1] - embeds[:, :, 1]) ** 2)
        + 0.1 * torch.mean((encoded[:, :, 0] - embeds[:, :, 0]) ** 2)
    )
