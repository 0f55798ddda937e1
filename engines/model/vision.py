"""Vision tower: a 3D backbone, then the feature combiner with a global and a local CLS token.

Structure of the paper code (models/vision_language.py ``_forward_axis2_combiner``): the backbone
(a ViT on 128 x 128 x 32 windows) yields patch tokens; averaging them over the two in-plane patch
axes of each window keeps one feature per (window column, depth token), the "axis2" features.
A linear ``axis_patch_proj`` and a transformer (the feature combiner) mix them over the whole
volume, with a global CLS and a local CLS token; averaging the combiner's outputs over the
in-plane cells gives one feature per depth token. The model then projects
``[local CLS, per-depth feature]`` with a copy of the image head to get per-depth embeddings,
``[CLS, mean per-depth]`` with the image head for the global embedding, and
``[local CLS, mean per-depth]`` with the copy for the embedding the disease prompts score.

``tiny`` swaps the ViT for a small 3D CNN whose feature map, pooled to a few in-plane cells per
depth token, plays the part of the axis2 features. Everything has static shapes and no
data-dependent control flow, so the graph exports to ONNX; padding depth tokens are masked out
of attention with an input mask rather than by cropping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engines.model.stem import HistogramStem
from engines.presets import (
    CNNBackboneConfig,
    CombinerConfig,
    ModelSpaceConfig,
    ViTBackboneConfig,
)

__all__ = [
    "Attention",
    "Block",
    "CNNBackbone",
    "Combiner",
    "ViTBackbone",
    "VisionTower",
    "build_backbone",
]


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head self-attention. Training and inference in torch use the fused kernel (flash /
    memory-efficient on GPUs: the paper preset's 36 windows x 512 tokens need it); ONNX export
    writes it out as MatMul/Softmax with the key mask as a Where, which opset 17 has."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        mask = None if key_valid is None else key_valid[:, None, None, :]
        if torch.onnx.is_in_onnx_export():
            scores = (q * self.scale) @ k.transpose(-2, -1)  # [b, h, n, n]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = scores.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj(out)  # type: ignore[no-any-return]


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (0 disables it)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gamma1: nn.Parameter | None = None
        self.gamma2: nn.Parameter | None = None
        if layer_scale > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        a: torch.Tensor = self.attn(self.norm1(x), key_valid)
        x = x + (a * self.gamma1 if self.gamma1 is not None else a)
        m: torch.Tensor = self.mlp(self.norm2(x))
        return x + (m * self.gamma2 if self.gamma2 is not None else m)


# ---------------------------------------------------------------------------------------------
# Backbones: [B, 1, Z, Y, X] -> [B, D, Gy, Gx, E] (depth token, in-plane cell, feature)


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def _groups(c: int) -> int:
    return math.gcd(c, 8)


def _norm(kind: str, c: int) -> nn.Module:
    return nn.BatchNorm3d(c) if kind == "batch" else nn.GroupNorm(_groups(c), c)


class _ResBlock(nn.Module):
    def __init__(self, c: int, norm: str = "group") -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c, c, 3, padding=1, bias=False)
        self.norm1 = _norm(norm, c)
        self.conv2 = nn.Conv3d(c, c, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(x + self.norm2(self.conv2(y)))


class CNNBackbone(nn.Module):
    """Strided 3D CNN. Each stage halves y and x; the depth strides multiply to one token.

    A depth stride ``s`` uses a kernel of ``s + 2`` with padding 1, so output ``t`` is centred
    on input slices ``[s*t, s*t + s)``: the feature of token ``t`` looks at token ``t``'s own
    slices (plus one on each side), which is what the depth targets assume.
    """

    win_scale: torch.Tensor
    win_shift: torch.Tensor

    def __init__(self, cfg: CNNBackboneConfig, space: ModelSpaceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        sp = cfg.stem_pool
        if space.slices_per_token % sp[0]:
            raise ValueError(f"stem_pool depth {sp[0]} must divide {space.slices_per_token}")
        factors = sorted(_prime_factors(space.slices_per_token // sp[0]), reverse=True)
        n = len(cfg.channels)
        if len(factors) > n:
            raise ValueError(f"{space.slices_per_token} slices/token needs more than {n} stages")
        zstrides = [1] * (n - len(factors)) + factors
        if cfg.stage_blocks and len(cfg.stage_blocks) != n:
            raise ValueError(f"stage_blocks {cfg.stage_blocks} must name {n} stages")
        self.stem = HistogramStem.from_config(cfg, space)
        scale, shift = self.stem.weights()
        self.register_buffer("win_scale", scale, False)
        self.register_buffer("win_shift", shift, False)
        # What a pre-computed stem looks like ([C, z, y, x]); see ``forward``.
        self.stem_shape = self.stem.output_shape(space.shape)
        stages: list[nn.Module] = []
        cin = self.stem.channels
        for i, (c, sz) in enumerate(zip(cfg.channels, zstrides, strict=True)):
            kz, pz = (3, 1) if sz == 1 else (sz + 2, 1)
            layers: list[nn.Module] = [
                nn.Conv3d(cin, c, (kz, 3, 3), stride=(sz, 2, 2), padding=(pz, 1, 1), bias=False),
                _norm(cfg.norm, c),
                nn.GELU(),
            ]
            layers += [_ResBlock(c, cfg.norm) for _ in range(cfg.blocks(i))]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.Sequential(*stages)
        _, ny, nx = space.shape
        fy, fx = ny // sp[1] // 2**n, nx // sp[2] // 2**n
        gy, gx = cfg.inplane_grid
        self.pool = (fy // gy, fx // gx)
        self.skip_norm: nn.Module | None = None
        if cfg.stem_skip:
            # BatchNorm whatever cfg.norm says: a per-sample norm would take out the absolute
            # tissue fractions that are the point of the skip.
            self.skip_norm = nn.BatchNorm3d(self.stem.channels)
            n_z = space.shape[0] // sp[0]
            self.skip_pool = (n_z // space.n_depth_tokens, ny // sp[1] // gy, nx // sp[2] // gx)
        self.out_dim = cfg.out_dim
        self.grid = (space.n_depth_tokens, gy, gx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the model-space volume ``[B, 1, Z, Y, X]``, or its stem ``[B, *stem_shape]``
        computed beforehand (training caches it per volume; the two cannot be confused, as
        the stem of a 1-channel unpooled volume is the volume itself)."""
        if tuple(x.shape[1:]) != self.stem_shape:
            x = self.stem.apply(x, self.win_scale, self.win_shift)
        f = self.stages(x)  # [B, C, D, fy, fx]
        f = F.avg_pool3d(f, kernel_size=(1, *self.pool))
        if self.skip_norm is not None:
            f = torch.cat([f, self.skip_norm(self._pool_skip(x))], dim=1)
        return f.permute(0, 2, 3, 4, 1)

    def _pool_skip(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's cells pooled to the token grid: means by their mean and, with
        ``stem_skip_extremes``, maxima by their maximum and minima by their minimum."""
        if not self.cfg.stem_skip_extremes:
            return F.avg_pool3d(x, kernel_size=self.skip_pool)
        n_mean, n_max = len(self.stem.scale), len(self.stem.max_channels)
        parts = [F.avg_pool3d(x[:, :n_mean], kernel_size=self.skip_pool)]
        if n_max:
            parts.append(F.max_pool3d(x[:, n_mean : n_mean + n_max], self.skip_pool))
        if self.stem.min_channels:
            parts.append(-F.max_pool3d(-x[:, n_mean + n_max :], self.skip_pool))
        return torch.cat(parts, dim=1)


class ViTBackbone(nn.Module):
    """ViT applied to each non-overlapping window of the volume (SPECTRE's local network),
    returning per window the patch tokens averaged over their in-plane axes."""

    def __init__(self, cfg: ViTBackboneConfig, space: ModelSpaceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_windows = tuple(n // w for n, w in zip(space.shape, cfg.window, strict=True))
        self.p_grid = tuple(w // p for w, p in zip(cfg.window, cfg.patch, strict=True))
        n_patches = math.prod(self.p_grid)
        e = cfg.embed_dim
        self.patch_embed = nn.Conv3d(1, e, kernel_size=cfg.patch, stride=cfg.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches, e))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(e, cfg.num_heads, cfg.mlp_ratio, cfg.layer_scale_init) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(e, eps=1e-6)
        self.apply(_init_linear)
        self.out_dim = e
        nwz, nwy, nwx = self.n_windows
        self.grid = (nwz * self.p_grid[0], nwy, nwx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        (nz, ny, nx), (wz, wy, wx) = self.n_windows, self.cfg.window
        pz, py, px = self.p_grid
        w = x.reshape(b, nz, wz, ny, wy, nx, wx).permute(0, 1, 3, 5, 2, 4, 6)
        w = w.reshape(b * nz * ny * nx, 1, wz, wy, wx)
        t: torch.Tensor = self.patch_embed(w).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        e = t.shape[-1]
        t = t.reshape(b, nz, ny, nx, pz, py, px, e).mean(dim=(5, 6))  # axis2: [b,nz,ny,nx,pz,e]
        return t.permute(0, 1, 4, 2, 3, 5).reshape(b, nz * pz, ny, nx, e)


def build_backbone(
    cfg: CNNBackboneConfig | ViTBackboneConfig, space: ModelSpaceConfig
) -> CNNBackbone | ViTBackbone:
    if isinstance(cfg, ViTBackboneConfig):
        return ViTBackbone(cfg, space)
    return CNNBackbone(cfg, space)


# ---------------------------------------------------------------------------------------------
# Combiner


class Combiner(nn.Module):
    """Transformer over all (depth, cell) features with a global and a local CLS token.

    Position embeddings are learned per axis and summed (depth + row + column): the paper uses
    RoPE with physical coordinates, which needs per-sample grids; our grids are fixed by the
    preset, and absolute embeddings keep the ONNX graph static.
    """

    def __init__(self, cfg: CombinerConfig, in_dim: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        e = cfg.embed_dim
        d, gy, gx = grid
        self.grid = grid
        self.axis_patch_proj = nn.Linear(in_dim, e)
        self.pos_depth = nn.Parameter(torch.zeros(d, e))
        self.pos_row = nn.Parameter(torch.zeros(gy, e))
        self.pos_col = nn.Parameter(torch.zeros(gx, e))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.local_cls_token = nn.Parameter(torch.zeros(1, 1, e))
        for p in (self.pos_depth, self.pos_row, self.pos_col, self.cls_token, self.local_cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(
            Block(e, cfg.num_heads, cfg.mlp_ratio, cfg.layer_scale_init) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(e, eps=1e-6)
        self.apply(_init_linear)
        self.readout: nn.Linear | None = None
        if cfg.region_readout:
            rd, ry, rx = cfg.region_readout
            if d % rd or gy % ry or gx % rx:
                raise ValueError(f"region_readout {cfg.region_readout} must divide {grid}")
            self.region_pool = (d // rd, gy // ry, gx // rx)
            self.readout = nn.Linear(rd * ry * rx * e, 2 * e)
            nn.init.zeros_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)
        self.input_readout: nn.Linear | None = None
        if cfg.input_readout:
            if not cfg.region_readout:
                raise ValueError("input_readout needs region_readout (its regions)")
            self.input_readout = nn.Linear(rd * ry * rx * in_dim, 2 * e)
            nn.init.zeros_(self.input_readout.weight)
            nn.init.zeros_(self.input_readout.bias)
        self.depth_readout: nn.Linear | None = None
        if cfg.depth_readout:
            self.depth_readout = nn.Linear(gy * gx * e, e)
            nn.init.zeros_(self.depth_readout.weight)
            nn.init.zeros_(self.depth_readout.bias)
        self.out_dim = e

    def forward(
        self, feats: torch.Tensor, depth_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``feats [B, D, Gy, Gx, Ein]``, ``depth_valid [B, D]`` (bool) ->
        ``cls [B, E]``, ``local_cls [B, E]``, ``per_depth [B, D, E]``."""
        b = feats.shape[0]
        d, gy, gx = self.grid
        pos = (
            self.pos_depth[:, None, None, :]
            + self.pos_row[None, :, None, :]
            + self.pos_col[None, None, :, :]
        )
        x = (self.axis_patch_proj(feats) + pos).reshape(b, d * gy * gx, -1)
        x = torch.cat(
            [self.cls_token.expand(b, -1, -1), self.local_cls_token.expand(b, -1, -1), x], dim=1
        )
        key_valid: torch.Tensor | None = None
        if depth_valid is not None:
            tokens = depth_valid.to(torch.bool)[:, :, None].expand(b, d, gy * gx).reshape(b, -1)
            key_valid = torch.cat([tokens.new_ones((b, 2)), tokens], dim=1)
        for blk in self.blocks:
            x = blk(x, key_valid)
        x = self.norm(x)
        tokens = x[:, 2:]
        per_depth = tokens.reshape(b, d, gy * gx, -1).mean(dim=2)
        if self.depth_readout is not None:
            per_depth = per_depth + self.depth_readout(tokens.reshape(b, d, -1))
        cls, local_cls = x[:, 0], x[:, 1]
        for readout, source in ((self.readout, tokens), (self.input_readout, feats)):
            if readout is not None:
                extra_cls, extra_local = readout(self._regions(source, key_valid)).chunk(2, -1)
                cls, local_cls = cls + extra_cls, local_cls + extra_local
        return cls, local_cls, per_depth

    def _regions(self, cells: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        """``[B, D*Gy*Gx, C]`` or ``[B, D, Gy, Gx, C]`` -> ``[B, regions * C]``, the means
        over ``region_readout`` regions, flattened channel-major."""
        b = cells.shape[0]
        d, gy, gx = self.grid
        cells = cells.reshape(b, d * gy * gx, -1)
        # Padding depths count as zeros in their region's mean (static shapes for ONNX).
        if key_valid is not None:
            cells = cells * key_valid[:, 2:, None].to(cells.dtype)
        grid_cells = cells.reshape(b, d, gy, gx, -1).permute(0, 4, 1, 2, 3)
        return F.avg_pool3d(grid_cells, kernel_size=self.region_pool).flatten(1)


class VisionTower(nn.Module):
    """Backbone + combiner: volume ``[B, 1, Z, Y, X]`` -> (cls, local_cls, per-depth features)."""

    def __init__(
        self,
        backbone_cfg: CNNBackboneConfig | ViTBackboneConfig,
        combiner_cfg: CombinerConfig,
        space: ModelSpaceConfig,
    ) -> None:
        super().__init__()
        self.space = space
        self.backbone = build_backbone(backbone_cfg, space)
        if self.backbone.grid[0] != space.n_depth_tokens:
            raise ValueError(
                f"backbone gives {self.backbone.grid[0]} depth positions, "
                f"model space has {space.n_depth_tokens} tokens"
            )
        self.combiner = Combiner(combiner_cfg, self.backbone.out_dim, self.backbone.grid)
        self.out_dim = self.combiner.out_dim

    @property
    def n_depth_tokens(self) -> int:
        return self.space.n_depth_tokens

    def forward(
        self, volume: torch.Tensor, depth_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls, local_cls, per_depth, _ = self.features(volume, depth_valid)
        return cls, local_cls, per_depth

    def features(
        self, volume: torch.Tensor, depth_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward``'s outputs and the backbone's tokens ``[B, D, Gy, Gx, C]`` the combiner
        read, for a readout that bypasses the combiner."""
        expected = (1, *self.space.shape)
        stemmed = getattr(self.backbone, "stem_shape", None)
        if not torch.onnx.is_in_onnx_export() and tuple(volume.shape[1:]) not in (
            expected,
            stemmed,
        ):
            raise ValueError(f"volume must be [B, {expected}], got {tuple(volume.shape)}")
        tokens = self.backbone(volume)
        cls, local_cls, per_depth = self.combiner(tokens, depth_valid)
        return cls, local_cls, per_depth, tokens
