"""The Agglomerator: GLOM-style columns of level embeddings that agree into islands.

Based on Hinton's GLOM, `mmlab-cv/Agglomerator` (CVPR 2022) and its SAM-distilling
follow-up `distill-part-whole` (ICCV 2023 workshop). Parameter names and shapes
equal the reference (``shared/reference/reference_state_dict_IMAGENETTE.json``),
so its published checkpoints load; the maths are the same, computed faster.

Shapes (one vocabulary everywhere): ``b`` batch, ``n`` columns (patches,
row-major ``G x G`` grid), ``l`` levels, ``d`` patch_dim, ``t`` iterations.

One iteration updates every level of every column as the mean of four
contributions (three for the top level, which has nothing above it)::

    level[i] <- ( wl  * level[i]                     # itself
                + wBU * bottom_up(level[i-1])        # the level below (level[-1] = image token)
                + wTD * top_down(level[i+1])         # the level above (none for the top)
                + wA  * consensus_attention(level[i])  # the same level of the other columns
                ) / (4 or 3)

Speed: the reference rearranged ``b n l d <-> b (l d) n`` around every column
net and flipped/padded/stacked tensors on every iteration. Here the whole
recurrence stays in one layout, ``l d b n``: the column nets' LayerNorm over
``n`` is then a last-dim ``layer_norm``, their grouped 1x1 convolutions are one
``bmm`` over levels on a free view ``(l, d, b*n)``, and levels are sliced and
concatenated along the leading axis without copies of the rest. The reference maths are kept in ``bench/reference_agglomerator.py``
as the baseline of ``bench/train_throughput.py`` and of the equivalence test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from partwhole.common.errors import SettingError

# Logit given to a column's attention to itself when attend_self is False (reference value).
TOKEN_ATTEND_SELF_VALUE = -5e-4


@dataclass(frozen=True)
class AgglomeratorConfig:
    """Architecture hyper-parameters (the reference's settings of the same names)."""

    image_size: int = 224
    conv_image_size: int = 56
    patch_size: int = 4
    patch_dim: int = 256
    levels: int = 3
    n_channels: int = 3
    n_classes: int = 10
    iters: int | None = None  # None: 2 * levels (reference default)
    denoise_iter: int = -1  # which iteration's top level feeds the heads (-1: last)
    levels_encoder: bool = False  # map final levels through a column encoder (to the teacher's dim)
    levels_encoder_dim: int = 256  # output dim of that encoder (reference: 256)
    levels_encoder_norm: str = "columns"  # its LayerNorms: over the columns (reference) or each column's features
    contrastive_head: bool = False  # add the original Agglomerator's projection head (supcon objective)
    contr_dim: int = 512
    dropout: float = 0.3  # dropout of the contrastive head (reference flag)
    head_dropout: float = 0.5  # dropout of the classification head (reference value)

    @property
    def grid(self) -> int:
        return self.conv_image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_iters(self) -> int:
        return self.iters if self.iters is not None else 2 * self.levels

    def validate(self) -> None:
        """Raise :class:`~partwhole.common.errors.SettingError` naming the field and the fix for inconsistent settings."""
        if self.levels < 2:
            raise SettingError("levels", self.levels, "the Agglomerator needs at least 2 levels")
        if self.image_size // 4 != self.conv_image_size or self.image_size % 4:
            raise SettingError("conv_image_size", self.conv_image_size,
                               f"must be image_size/4 (the conv tokenizer downsamples by 4): set "
                               f"conv_image_size={self.image_size // 4} or image_size={self.conv_image_size * 4}")
        if self.conv_image_size % self.patch_size:
            raise SettingError("patch_size", self.patch_size, f"must divide conv_image_size={self.conv_image_size}")
        if self.patch_dim % (self.patch_size**2) or self.patch_dim // (self.patch_size**2) < 2:
            raise SettingError("patch_dim", self.patch_dim,
                               f"must be a multiple of patch_size**2={self.patch_size ** 2} (at least twice it): the "
                               f"tokenizer makes patch_dim/patch_size**2 channels")
        if self.num_iters < 1:
            raise SettingError("iters", self.iters, "must be at least 1")
        if not -(self.num_iters + 1) <= self.denoise_iter <= self.num_iters:
            raise SettingError("denoise_iter", self.denoise_iter, f"must lie in [-{self.num_iters + 1}, {self.num_iters}]")

    def to_dict(self) -> dict:
        return asdict(self)


class AgglomeratorOutput(NamedTuple):
    """What :meth:`Agglomerator.forward` returns.

    top_level: ``(b, n, d)`` top level at ``denoise_iter``, L2-normalised over the
        columns ``n`` (reference semantics); input of the classification head.
    levels: ``(b, n, l, d)`` final levels of every column.
    encoded: ``(b, n, l, D)`` final levels through the levels encoder (or ``levels``):
        what the ``sam_distill`` objective regresses onto the teacher's embeddings.
    iterations: ``(b, t+1, n, l, d)`` the levels after every iteration, the initial
        state first (the reference's ``hiddens``), so ``iterations[:, -1] == levels``;
        only with ``forward(..., return_iterations=True)``, else None.
    """

    top_level: torch.Tensor
    levels: torch.Tensor
    encoded: torch.Tensor
    iterations: torch.Tensor | None = None


class ConvTokenizer(nn.Module):
    """Three 3x3 conv-BN-ReLU layers and a max-pool: ``b c H W -> b e H/4 W/4``."""

    def __init__(self, in_channels: int = 3, embedding_dim: int = 64):
        super().__init__()
        half = embedding_dim // 2
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, embedding_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(embedding_dim),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class PatchTokens(nn.Module):
    """``b e (h p1) (w p2) -> b (h w) (e p1 p2)``: one token of patch_dim per patch."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        return rearrange(x, "b e (h p1) (w p2) -> b (h w) (e p1 p2)", p1=p, p2=p)


class Sine(nn.Module):
    """``sin(x)``: the top-down nets' activation (SIREN-style, as in GLOM implementations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


NORMS = ("columns", "features")  # what a ColumnNet's LayerNorms normalise over


class ColumnNet(nn.Module):
    """Per-level MLPs shared by all columns: ``levels`` groups of ``d -> hidden... -> out``.

    Every layer is ``LayerNorm over the n columns`` then a grouped 1x1 conv (one
    weight matrix per level), as in the reference. ``net`` keeps the reference's
    module indices (index 0 stands where the reference had a parameter-free
    rearrange), so state-dict names match.

    ``norm="features"`` normalises each column's vector over its features instead
    (a per-token LayerNorm). A LayerNorm over the columns gives every feature zero
    mean over an image's columns, so after it the mean over columns of the net's
    output is the same for every image (the last conv's bias, up to the
    per-column affine weights): what all columns of an image share (the image's
    class, the embedding of "all objects" that every object point has) cannot
    reach the output. The toy study measures what that costs the levels encoder.

    Input and output are in the ``l d b n`` layout; ``reverse_groups`` feeds level
    ``i`` to group ``groups-1-i`` (the top-down net's order in the reference, which
    flipped the levels instead).
    """

    def __init__(self, dim: int, groups: int, num_patches: int, *, mult: int = 4, hidden_layers: int = 1,
                 out_dim: int | None = None, activation: type[nn.Module] = nn.GELU, norm: str = "columns"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: choose one of {', '.join(NORMS)}")
        self.groups, self.norm = groups, norm
        widths = [dim] + [dim * mult] * hidden_layers + [out_dim or dim]
        layers: list[nn.Module] = [nn.Identity()]
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(activation())
            layers += [nn.LayerNorm(num_patches if norm == "columns" else w_in),
                       nn.Conv1d(w_in * groups, w_out * groups, 1, groups=groups)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, reverse_groups: bool = False) -> torch.Tensor:
        """``x``: ``(groups, d_in, b, n)`` -> ``(groups, d_out, b, n)``.

        Each LayerNorm is over the last, contiguous dimension and each grouped conv one ``baddbmm``: with
        ``norm="columns"`` in the ``(groups, d, b, n)`` layout itself, with ``norm="features"`` in the
        ``(groups, b*n, d)`` layout (with the transposed weights: one copy in, one view out, instead of two
        transposed copies per LayerNorm).
        """
        g, _, b, n = x.shape
        features = self.norm == "features"
        if features:
            x = x.permute(0, 2, 3, 1).reshape(g, b * n, -1)
        for layer in list(self.net)[1:]:
            if isinstance(layer, nn.LayerNorm):
                x = F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
            elif isinstance(layer, nn.Conv1d):
                w = layer.weight.view(g, layer.out_channels // g, -1)  # (g, out, in)
                bias = layer.bias.view(g, 1, -1) if features else layer.bias.view(g, -1, 1)
                if reverse_groups:
                    w, bias = w.flip(0), bias.flip(0)
                if features:
                    x = torch.baddbmm(bias, x, w.transpose(1, 2))
                else:
                    x = torch.baddbmm(bias, w, x.reshape(g, -1, b * n)).view(g, -1, b, n)
            else:
                x = layer(x)
        return x.view(g, b, n, -1).permute(0, 3, 1, 2) if features else x


def consensus_attention(x: torch.Tensor, attend_self: bool = False) -> torch.Tensor:
    """Each column's level attends over the same level of every column.

    ``x``: ``(l, d, b, n)``. Queries and values are the levels, keys the
    L2-normalised levels, scaled by ``d**-0.5`` (reference semantics). Without
    ``attend_self`` a column's logit for itself is the small constant
    :data:`TOKEN_ATTEND_SELF_VALUE`.
    """
    d, n = x.shape[1], x.shape[-1]
    keys = F.normalize(x, dim=1)
    sim = torch.einsum("ldbi,ldbj->lbij", x, keys) * d**-0.5
    if not attend_self:
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        sim = sim.masked_fill(eye, TOKEN_ATTEND_SELF_VALUE)
    attn = sim.softmax(dim=-1)
    return torch.einsum("lbij,ldbj->ldbi", attn, x)


def flat_columns(n: int, d: int, dropout: float) -> list[nn.Module]:
    """The heads' common start (reference layers and indices): ``(b, n, d)`` normalised per column, flattened to
    ``(b, n*d)`` and normalised again, with dropout after each norm."""
    return [nn.LayerNorm(d), nn.Dropout(dropout), nn.Flatten(1), nn.LayerNorm(n * d), nn.Dropout(dropout)]


HEAD_PREFIXES = ("classification_head_from_last_level.", "contrastive_head.")  # the heads' parameter names


class Agglomerator(nn.Module):
    """Image -> tokens -> ``iters`` GLOM iterations over ``levels`` levels per column.

    Module and parameter names follow the reference (``image_to_tokens``,
    ``bottom_up``, ``top_down``, ``init_levels``, ``wl wBU wTD wA``,
    ``levels_encoder``, ``classification_head_from_last_level``,
    ``contrastive_head``).
    """

    def __init__(self, config: AgglomeratorConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        n, d = c.num_patches, c.patch_dim
        self.wl = nn.Parameter(torch.tensor(0.25))
        self.wBU = nn.Parameter(torch.tensor(0.25))
        self.wTD = nn.Parameter(torch.tensor(0.25))
        self.wA = nn.Parameter(torch.tensor(0.25))
        self.image_to_tokens = nn.Sequential(
            ConvTokenizer(c.n_channels, embedding_dim=d // c.patch_size**2), PatchTokens(c.patch_size)
        )
        self.classification_head_from_last_level = nn.Sequential(
            *flat_columns(n, d, c.head_dropout),
            nn.Linear(n * d, c.n_classes),
        )
        self.init_levels = nn.Parameter(torch.randn(c.levels, d))
        self.bottom_up = ColumnNet(d, c.levels, n, activation=nn.GELU)
        self.top_down = ColumnNet(d, c.levels - 1, n, activation=Sine)
        if c.levels_encoder:
            self.levels_encoder = ColumnNet(d, c.levels, n, hidden_layers=3, out_dim=c.levels_encoder_dim,
                                            norm=c.levels_encoder_norm)
        if c.contrastive_head:
            self.contrastive_head = nn.Sequential(
                *flat_columns(n, d, c.dropout),
                nn.Linear(n * d, n * d),
                nn.LayerNorm(n * d),
                nn.GELU(),
                nn.LayerNorm(n * d),
                nn.Dropout(c.dropout),
                nn.Linear(n * d, c.contr_dim),
            )
        contributions = torch.full((c.levels, 1, 1, 1), 4.0)
        contributions[-1] = 3.0  # the top level gets no top-down contribution
        self.register_buffer("inv_contributions", 1.0 / contributions, persistent=False)

    @property
    def embed_dim(self) -> int:
        """Dimension of :attr:`AgglomeratorOutput.encoded` (what the teacher's ``D`` must be)."""
        return self.config.levels_encoder_dim if self.config.levels_encoder else self.config.patch_dim

    def tokens(self, img: torch.Tensor) -> torch.Tensor:
        """``(b, c, H, W)`` image -> ``(b, n, d)`` patch tokens."""
        return self.image_to_tokens(img)

    def iterate(self, tokens: torch.Tensor, levels: torch.Tensor | None = None,
                history: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the GLOM iterations in the ``l d b n`` layout.

        ``tokens`` ``(b, n, d)``; ``levels`` ``(l, d, b, n)`` or None (learned
        initial levels). Returns ``(final, denoise)``: the final levels and the
        levels at ``denoise_iter``, both ``(l, d, b, n)``. A ``history`` list
        receives the state before the first iteration and after each one
        (``t+1`` tensors ``(l, d, b, n)``); each update makes a new tensor, so
        keeping them costs memory but no copies.
        """
        c = self.config
        b, n, _ = tokens.shape
        bottom = rearrange(tokens, "b n d -> () d b n")
        if levels is None:
            levels = rearrange(self.init_levels, "l d -> l d () ()").expand(-1, -1, b, n).contiguous()
        wanted = c.denoise_iter % (c.num_iters + 1)
        denoise = levels
        if history is not None:
            history.append(levels)
        for t in range(1, c.num_iters + 1):
            below = torch.cat((bottom, levels[:-1]))  # what each level's bottom-up net reads
            bottom_up = self.bottom_up(below)
            top_down = self.top_down(levels[1:], reverse_groups=True)  # contributions to levels 0..l-2
            consensus = consensus_attention(levels)
            summed = levels * self.wl + bottom_up * self.wBU + consensus * self.wA
            summed = summed + F.pad(top_down * self.wTD, (0, 0, 0, 0, 0, 0, 0, 1))
            levels = summed * self.inv_contributions
            if history is not None:
                history.append(levels)
            if t == wanted:
                denoise = levels
        return levels, denoise

    def forward(self, img: torch.Tensor, levels: torch.Tensor | None = None,
                return_iterations: bool = False) -> AgglomeratorOutput:
        """``img`` ``(b, c, H, W)``; optional starting ``levels`` ``(b, n, l, d)``.

        With ``return_iterations`` the output's ``iterations`` holds every state
        ``(b, t+1, n, l, d)`` (for watching islands form); without, nothing extra
        is kept.
        """
        if levels is not None:
            levels = rearrange(levels, "b n l d -> l d b n").contiguous()
        history: list[torch.Tensor] | None = [] if return_iterations else None
        final, denoise = self.iterate(self.tokens(img), levels, history)
        top_level = F.normalize(rearrange(denoise[-1], "d b n -> b n d"), dim=1)
        encoded = self.levels_encoder(final) if self.config.levels_encoder else final
        return AgglomeratorOutput(
            top_level=top_level,
            levels=rearrange(final, "l d b n -> b n l d"),
            encoded=rearrange(encoded, "l d b n -> b n l d"),
            iterations=None if history is None else rearrange(torch.stack(history), "t l d b n -> b t n l d"),
        )

    def classify(self, top_level: torch.Tensor) -> torch.Tensor:
        """``(b, n, d)`` top level -> ``(b, n_classes)`` logits."""
        return self.classification_head_from_last_level(top_level)

    def project(self, top_level: torch.Tensor) -> torch.Tensor:
        """``(b, n, d)`` -> ``(b, contr_dim)`` L2-normalised contrastive features (supcon objective)."""
        if not self.config.contrastive_head:
            raise RuntimeError("this Agglomerator was built without contrastive_head (needed by the supcon objective)")
        return F.normalize(self.contrastive_head(top_level), dim=1)

    def compile_column_nets(self) -> None:
        """``torch.compile`` the column nets only (bottom-up, top-down, levels encoder), in place.

        On a CPU they hold most of a step (LayerNorm over the columns, dtype casts, GELU/sine, the
        grouped matmuls) and compile into a few small graphs in tens of seconds, where the whole
        unrolled model takes minutes for less gain (``bench/train_throughput.py``, toy sizes).
        Parameter names, and so checkpoints, stay the same.
        """
        for net in (self.bottom_up, self.top_down, getattr(self, "levels_encoder", None)):
            if net is not None:
                net.compile()

    def backbone_parameters(self):
        """Parameters of everything but the heads (what fine-tuning freezes by default)."""
        return [p for name, p in self.named_parameters() if not name.startswith(HEAD_PREFIXES)]
