"""RadFinder: vision tower, text tower, SigLIP projection heads and the scoring of disease prompts.

Layout follows the paper code (models/vision_language.py, models/siglip_head.py) and open_clip's
split: the model only produces embeddings; ``engines.losses`` turns them into losses; the training
loop (later) owns batching and optimisation.

Heads (paper: ``projector_mode_image/text: copy``). Four projection heads share one space:
``image_head`` for the global image embedding (SigLIP against reports), ``image_head_local``
(a copy, initialised from it) for per-depth embeddings and for the image embedding that disease
prompts score, ``text_head`` for reports and prompts, and ``text_head_local`` (a copy) for
snippets and for the prompt that localizes a label. The copies let the localization objective
reshape its own projection without pulling the global SigLIP space along.

Probabilities. Per label the positive and negative prompt are scored against the image:
``logit = e^t' cos + b``; the probability is ``softmax([logit_pos, logit_neg])[0]``, which is
exactly ``sigmoid(logit_pos - logit_neg) = sigmoid(e^t' (cos_pos - cos_neg))`` (b cancels): the
same quantity the prompt loss trains with BCE, so training and inference agree.

Depth distribution. Per label the positive prompt (through ``text_head_local``) is compared with
every depth embedding: ``softmax over valid depths of cos / tau`` with the localization loss's
tau (0.1). Padding depths get probability 0.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engines.data.labels import LABELS
from engines.model.text import PROMPT_TEMPLATES, TextTower, default_text_model_path, disease_prompts
from engines.model.vision import VisionTower
from engines.presets import HeadConfig, ModelConfig, ModelSpaceConfig, Preset

__all__ = [
    "Prediction",
    "ProjectionHead",
    "PromptEmbeddings",
    "RadFinder",
    "RadFinderOutput",
    "VisionGraph",
    "VisionOutput",
    "build_model",
    "export_vision_onnx",
    "score_labels",
]


class ProjectionHead(nn.Module):
    """The paper's SigLIP head: Linear-GELU-Linear-GELU-Linear to a bottleneck, then a linear
    layer whose rows are L2-normalised (weight norm with the gain fixed at 1, the paper's
    ``norm_last_layer``), which keeps the output scale from drifting while the MLP trains."""

    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        h, k = cfg.hidden_dim, cfg.bottleneck_dim
        layers: list[nn.Module] = []
        for a, b in ((in_dim, h), (h, h)):
            layers.append(nn.Linear(a, b, bias=not cfg.layer_norm))
            if cfg.layer_norm:
                layers.append(nn.LayerNorm(b))
            layers.append(nn.GELU())
        layers.append(nn.Linear(h, k))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                if cfg.init == "0.02":
                    nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                else:
                    std = m.in_features**-0.5
                    nn.init.trunc_normal_(m.weight, std=std, a=-2.0 * std, b=2.0 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_weight = nn.Parameter(torch.empty(cfg.output_dim, k))
        nn.init.kaiming_uniform_(self.last_weight, a=math.sqrt(5))
        # Zero at the start, so a head with the skip starts as the paper's head does.
        self.skip: nn.Linear | None = None
        if cfg.skip:
            self.skip = nn.Linear(in_dim, cfg.output_dim, bias=False)
            nn.init.zeros_(self.skip.weight)
        self.in_dim = in_dim
        self.out_dim = cfg.output_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.mlp(x), F.normalize(self.last_weight, dim=1))
        if self.skip is not None:
            out = out + self.skip(x)
        return out


class VisionOutput(NamedTuple):
    """Unnormalised embeddings: global ``[B, P]``, prompt-scored ``[B, P]``, depth ``[B, D, P]``."""

    image_embedding: torch.Tensor
    image_embedding_local: torch.Tensor
    depth_embeddings: torch.Tensor
    # What the supervised label head reads (``RadFinder.label_logits``); None without one.
    label_input: torch.Tensor | None = None


@dataclass(frozen=True)
class PromptEmbeddings:
    """L2-normalised prompt embeddings: ``classify [L, V, 2, P]`` (positive, negative through
    ``text_head``) and ``locate [L, V, P]`` (positive through ``text_head_local``), V templates."""

    classify: torch.Tensor
    locate: torch.Tensor

    def ensemble(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Template-averaged, re-normalised ``([L, 2, P], [L, P])``: what inference scores."""
        return (
            F.normalize(self.classify.mean(dim=1), dim=-1),
            F.normalize(self.locate.mean(dim=1), dim=-1),
        )

    def detach(self) -> PromptEmbeddings:
        return PromptEmbeddings(self.classify.detach(), self.locate.detach())


@dataclass
class RadFinderOutput:
    """Everything the losses need from one forward pass (embeddings unnormalised)."""

    image_embedding: torch.Tensor
    image_embedding_local: torch.Tensor
    depth_embeddings: torch.Tensor
    depth_valid: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor
    report_embedding: torch.Tensor | None = None
    snippet_embedding: torch.Tensor | None = None
    prompts: PromptEmbeddings | None = None
    # The supervised label head's input (``VisionOutput.label_input``; None without a head),
    # cached with the embeddings by the accumulation step, and its logits ``[B, L]``, set where
    # the losses are taken (``RadFinder.label_logits``), as the prompts are.
    label_input: torch.Tensor | None = None
    label_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class Prediction:
    """DESIGN §3 Prediction: per label a probability and a depth distribution, plus the global
    embedding. Shapes: ``probabilities [B, L]``, ``depth_distribution [B, L, D]`` (sums to 1
    over valid depths), ``image_embedding [B, P]`` and ``depth_embeddings [B, D, P]``
    (L2-normalised), ``depth_valid [B, D]``."""

    probabilities: torch.Tensor
    depth_distribution: torch.Tensor
    image_embedding: torch.Tensor
    depth_embeddings: torch.Tensor
    depth_valid: torch.Tensor

    @property
    def depth_argmax(self) -> torch.Tensor:
        """Most likely depth token per label, ``[B, L]``."""
        return self.depth_distribution.argmax(dim=-1)


def score_labels(
    image_local: torch.Tensor,
    depth_embeddings: torch.Tensor,
    depth_valid: torch.Tensor,
    classify: torch.Tensor,
    locate: torch.Tensor,
    logit_scale: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities [B, L], depth_distribution [B, L, D])`` from embeddings and prompts
    (``classify [L, 2, P]``, ``locate [L, P]``, both normalised). Pure tensor code, shared by
    ``RadFinder.predict`` and the exported ONNX graph."""
    x = F.normalize(image_local, dim=-1)
    cos = torch.einsum("bp,lkp->blk", x, classify)
    probabilities = torch.sigmoid(logit_scale.exp() * (cos[..., 0] - cos[..., 1]))
    d = F.normalize(depth_embeddings, dim=-1)
    sim = torch.einsum("bdp,lp->bld", d, locate) / tau
    valid = depth_valid.to(torch.bool)[:, None, :]
    sim = torch.where(valid, sim, torch.full_like(sim, torch.finfo(sim.dtype).min))
    return probabilities, sim.softmax(dim=-1)


class RadFinder(nn.Module):
    """The model. Text enters as pooled text-tower features ``[N, H]`` (from ``text_features``
    or a ``TextFeatureCache``), so a frozen tower's features can be computed once."""

    def __init__(
        self,
        config: ModelConfig,
        space: ModelSpaceConfig,
        *,
        text_dim: int,
        text_tower: TextTower | None = None,
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        localization_tau: float = 0.1,
        label_head: bool = False,
        label_head_input: str = "embedding",
    ) -> None:
        super().__init__()
        if text_tower is not None and text_tower.hidden_size != text_dim:
            raise ValueError(f"text tower gives {text_tower.hidden_size}-d, not {text_dim}")
        self.config = config
        self.space = space
        self.vision = VisionTower(config.backbone, config.combiner, space)
        vision_dim = 2 * self.vision.out_dim  # [CLS or local CLS, per-depth feature]
        self.feature_norm: nn.ModuleList | None = None
        if config.feature_norm == "batch":  # cls, local cls, per-depth: one BN each
            self.feature_norm = nn.ModuleList(
                nn.BatchNorm1d(self.vision.out_dim) for _ in range(3)
            )
        self.image_head = ProjectionHead(vision_dim, config.head)
        self.image_head_local = copy.deepcopy(self.image_head)
        self.text_head = ProjectionHead(text_dim, config.head)
        self.text_head_local = copy.deepcopy(self.text_head)
        # Linear label logits (LossConfig.label_head_weight) from the normalised prompt-scored
        # embedding, the space the prompts score, or from the neck ("neck": the prompt-scored
        # head's input, its depth mean detached; LossConfig.label_head_input).
        # "neck_pool" adds the backbone's tokens mean-pooled over valid depths and cells, with
        # their gradient: the route a bare-backbone probe learned the diffuse lung labels on
        # about three times faster than through the combiner (bench/RESULTS.md).
        if label_head_input not in ("embedding", "neck", "neck_pool"):
            raise ValueError(
                f"label_head_input: embedding, neck or neck_pool, not {label_head_input!r}"
            )
        self.label_head_input = label_head_input
        label_dim = {
            "embedding": config.head.output_dim,
            "neck": vision_dim,
            "neck_pool": vision_dim + self.vision.backbone.out_dim,
        }[label_head_input]
        self.label_head = nn.Linear(label_dim, len(LABELS)) if label_head else None
        self.text = text_tower
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))  # t'
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))  # b
        self.localization_tau = float(localization_tau)
        self.text_dim = text_dim
        # Standardisation of pooled text features (identity until ``set_text_normalization``).
        # A frozen MiniLM puts every synthetic report at cosine ~0.84 to every other; the heads
        # start from that shared direction and SigLIP settles in the constant solution (all
        # pairs equally similar, loss B·softplus… = 3.74 at B=16, seen in a 600-step run).
        # Centring and scaling by the training corpus' statistics removes the shared part.
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("text_std", torch.ones(text_dim))

    @property
    def embed_dim(self) -> int:
        return self.config.head.output_dim

    @property
    def n_depth_tokens(self) -> int:
        return self.space.n_depth_tokens

    # --- image ---------------------------------------------------------------------------

    def encode_image(
        self, volume: torch.Tensor, depth_valid: torch.Tensor | None = None
    ) -> VisionOutput:
        """``volume [B, 1, Z, Y, X]`` (model space), ``depth_valid [B, D]`` (None: all valid)."""
        if depth_valid is None:
            depth_valid = torch.ones(
                volume.shape[0], self.n_depth_tokens, dtype=torch.bool, device=volume.device
            )
        cls, local_cls, per_depth, mean_depth, tokens = self._features(volume, depth_valid)
        d = per_depth.shape[1]
        depth = self.image_head_local(
            torch.cat([local_cls[:, None].expand(-1, d, -1), per_depth], 2)
        )
        if not self.config.embedding_depth_mean:
            mean_depth = torch.zeros_like(mean_depth)
        image = self.image_head(torch.cat([cls, mean_depth], dim=1))
        local_mean = mean_depth if self.config.prompt_depth_mean_grad else mean_depth.detach()
        image_local = self.image_head_local(torch.cat([local_cls, local_mean], dim=1))
        label_input: torch.Tensor | None = None
        if self.label_head is not None:
            if self.label_head_input == "embedding":
                label_input = image_local
            else:
                label_input = torch.cat([local_cls, mean_depth.detach()], dim=1)
                if self.label_head_input == "neck_pool":
                    label_input = torch.cat([label_input, _valid_mean(tokens, depth_valid)], 1)
        return VisionOutput(image, image_local, depth, label_input)

    def head_inputs(
        self, volume: torch.Tensor, depth_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tower's features after the neck, as the image heads read them: ``cls [B, E]``,
        ``local_cls [B, E]``, ``per_depth [B, D, E]`` and their mean over valid depths
        ``[B, E]``. Separate so probes can read what the heads are given."""
        return self._features(volume, depth_valid)[:4]

    def _features(
        self, volume: torch.Tensor, depth_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``head_inputs`` and the backbone's tokens ``[B, D, Gy, Gx, C]`` they came from."""
        cls, local_cls, per_depth, tokens = self.vision.features(volume, depth_valid)
        if self.feature_norm is not None:
            bn_cls, bn_local, bn_depth = self.feature_norm
            cls, local_cls = bn_cls(cls), bn_local(local_cls)
            per_depth = bn_depth(per_depth.reshape(-1, per_depth.shape[-1])).reshape(
                per_depth.shape
            )
        return cls, local_cls, per_depth, _valid_mean(per_depth, depth_valid), tokens

    def label_logits(self, label_input: torch.Tensor | None) -> torch.Tensor | None:
        """The label head's logits ``[B, L]`` from ``VisionOutput.label_input``, or None for a
        model without a head."""
        if self.label_head is None or label_input is None:
            return None
        if self.label_head_input == "embedding":
            label_input = F.normalize(label_input, dim=-1)
        out: torch.Tensor = self.label_head(label_input)
        return out

    # --- text ----------------------------------------------------------------------------

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled features of texts through the model's own tower (trainable unless frozen)."""
        if self.text is None:
            raise RuntimeError("this model has no text tower; pass pooled features instead")
        return self.text.embed(texts)

    @torch.no_grad()
    def set_text_normalization(self, features: torch.Tensor) -> None:
        """Fix the text standardisation from pooled features ``[N, H]`` of the training texts.
        Only for a frozen tower: a trainable one would move away from the statistics."""
        if features.ndim != 2 or features.shape[1] != self.text_dim or features.shape[0] < 2:
            raise ValueError(f"need [N >= 2, {self.text_dim}] features, got {features.shape}")
        f = features.float()
        self.get_buffer("text_mean").copy_(f.mean(0))
        self.get_buffer("text_std").copy_(f.std(0).clamp(min=1e-4))

    def normalize_text(self, features: torch.Tensor) -> torch.Tensor:
        mean, std = self.get_buffer("text_mean"), self.get_buffer("text_std")
        return (features - mean.to(features.dtype)) / std.to(features.dtype)

    def encode_reports(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.text_head(self.normalize_text(features))
        return out

    def encode_snippets(self, features: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.text_head_local(self.normalize_text(features))
        return out

    def encode_prompts(self, positive: torch.Tensor, negative: torch.Tensor) -> PromptEmbeddings:
        """Pooled features ``[L, V, H]`` of positive and negative prompts -> embeddings."""
        if positive.shape != negative.shape or positive.ndim != 3:
            raise ValueError(
                f"prompt features must both be [L, V, H], got "
                f"{tuple(positive.shape)} and {tuple(negative.shape)}"
            )
        both = self.normalize_text(torch.stack([positive, negative], dim=2))  # [L, V, 2, H]
        classify = F.normalize(self.text_head(both), dim=-1)
        locate = F.normalize(self.text_head_local(self.normalize_text(positive)), dim=-1)
        return PromptEmbeddings(classify, locate)

    def prompt_embeddings(
        self,
        labels: Sequence[str] | None = None,
        templates: Sequence[tuple[str, str]] = PROMPT_TEMPLATES,
    ) -> PromptEmbeddings:
        """Embed the disease prompts of ``labels`` (default: the 18 CT-RATE labels) with the
        model's own text tower; a bundle stores the result so serving needs no text tower."""
        pos, neg = disease_prompts(LABELS if labels is None else labels, templates)
        n_l, n_v = len(pos), len(templates)
        flat = [t for row in pos for t in row] + [t for row in neg for t in row]
        feats = self.text_features(flat)
        p, n = feats[: n_l * n_v], feats[n_l * n_v :]
        return self.encode_prompts(p.reshape(n_l, n_v, -1), n.reshape(n_l, n_v, -1))

    # --- forward / predict ---------------------------------------------------------------

    def forward(
        self,
        volume: torch.Tensor,
        depth_valid: torch.Tensor | None = None,
        *,
        report_features: torch.Tensor | None = None,
        snippet_features: torch.Tensor | None = None,
        prompt_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> RadFinderOutput:
        """One training forward: image embeddings, and the text sides that were given."""
        if depth_valid is None:
            depth_valid = torch.ones(
                volume.shape[0], self.n_depth_tokens, dtype=torch.bool, device=volume.device
            )
        img = self.encode_image(volume, depth_valid)
        return RadFinderOutput(
            image_embedding=img.image_embedding,
            image_embedding_local=img.image_embedding_local,
            depth_embeddings=img.depth_embeddings,
            depth_valid=depth_valid.to(torch.bool),
            logit_scale=self.logit_scale,
            logit_bias=self.logit_bias,
            label_input=img.label_input,
            report_embedding=None
            if report_features is None
            else self.encode_reports(report_features),
            snippet_embedding=None
            if snippet_features is None
            else self.encode_snippets(snippet_features),
            prompts=None if prompt_features is None else self.encode_prompts(*prompt_features),
        )

    def predict(
        self, volume: torch.Tensor, depth_valid: torch.Tensor | None, prompts: PromptEmbeddings
    ) -> Prediction:
        """Inference: the DESIGN §3 Prediction for a batch of model-space volumes."""
        if depth_valid is None:
            depth_valid = torch.ones(
                volume.shape[0], self.n_depth_tokens, dtype=torch.bool, device=volume.device
            )
        img = self.encode_image(volume, depth_valid)
        classify, locate = prompts.ensemble()
        prob, dist = score_labels(
            img.image_embedding_local,
            img.depth_embeddings,
            depth_valid,
            classify,
            locate,
            self.logit_scale,
            self.localization_tau,
        )
        return Prediction(
            probabilities=prob,
            depth_distribution=dist,
            image_embedding=F.normalize(img.image_embedding, dim=-1),
            depth_embeddings=F.normalize(img.depth_embeddings, dim=-1),
            depth_valid=depth_valid.to(torch.bool),
        )


# ---------------------------------------------------------------------------------------------
# Export


class VisionGraph(nn.Module):
    """The part of the model a bundle serves: volume -> embeddings (and, with prompts baked in as
    constants, probabilities and depth distributions). Static shapes, no text tower."""

    def __init__(self, model: RadFinder, prompts: PromptEmbeddings | None = None) -> None:
        super().__init__()
        self.model = model
        self.has_prompts = prompts is not None
        if prompts is not None:
            classify, locate = prompts.detach().ensemble()
            self.register_buffer("classify", classify.clone())
            self.register_buffer("locate", locate.clone())

    @property
    def output_names(self) -> list[str]:
        names = ["image_embedding", "depth_embeddings"]
        return [*names, "probabilities", "depth_distribution"] if self.has_prompts else names

    def forward(self, volume: torch.Tensor, depth_valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        img = self.model.encode_image(volume, depth_valid)
        out = (F.normalize(img.image_embedding, dim=-1), F.normalize(img.depth_embeddings, dim=-1))
        if not self.has_prompts:
            return out
        prob, dist = score_labels(
            img.image_embedding_local,
            img.depth_embeddings,
            depth_valid,
            self.get_buffer("classify"),
            self.get_buffer("locate"),
            self.model.logit_scale,
            self.model.localization_tau,
        )
        return (*out, prob, dist)


def export_vision_onnx(
    model: RadFinder,
    path: str | Path,
    *,
    prompts: PromptEmbeddings | None = None,
    batch_size: int = 1,
    opset: int = 17,
) -> list[str]:
    """Write the vision graph to ``path`` (inputs ``volume [B, 1, Z, Y, X]`` float32 and
    ``depth_valid [B, D]`` bool, all shapes static). Returns the output names.

    Uses the TorchScript-based exporter: the dynamo exporter needs onnxscript, which this
    project does not install, and the graph has no control flow for it to gain on.
    """
    if opset < 17:
        raise ValueError("opset must be >= 17 (LayerNormalization)")
    graph = VisionGraph(model, prompts).eval()
    volume = torch.zeros((batch_size, 1, *model.space.shape), dtype=torch.float32)
    valid = torch.ones((batch_size, model.n_depth_tokens), dtype=torch.bool)
    names = graph.output_names
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter announces its own deprecation, and GroupNorm's batch-size
            # check trips a TracerWarning; neither applies to a static-shape graph.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Converting a tensor to a Python")
            torch.onnx.export(
                graph,
                (volume, valid),
                str(path),
                input_names=["volume", "depth_valid"],
                output_names=names,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    return names


def _valid_mean(x: torch.Tensor, depth_valid: torch.Tensor) -> torch.Tensor:
    """``x [B, D, ...rest, C]`` averaged over the valid depths ``depth_valid [B, D]`` and the
    ``rest`` axes -> ``[B, C]``."""
    x = x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]).mean(dim=2)
    w = depth_valid.to(x.dtype)[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def build_model(
    preset: Preset, *, text_tower: TextTower | None = None, load_text: bool = True
) -> RadFinder:
    """A fresh model for ``preset``. The text tower comes from ``text_tower``, else is loaded
    from the preset's text model when ``load_text``; without one the model takes pooled
    features whose width is read from the text model's config."""
    tcfg = preset.model.text
    if text_tower is None and load_text:
        text_tower = TextTower.from_pretrained(
            tcfg.model, max_length=tcfg.max_length, freeze=tcfg.freeze
        )
    if text_tower is not None:
        text_dim = text_tower.hidden_size
    else:
        from transformers import AutoConfig

        where = tcfg.model if tcfg.model is not None else str(default_text_model_path())
        text_dim = int(AutoConfig.from_pretrained(where, local_files_only=True).hidden_size)
    return RadFinder(
        preset.model,
        preset.space,
        text_dim=text_dim,
        text_tower=text_tower,
        init_logit_scale=preset.loss.init_logit_scale,
        init_logit_bias=preset.loss.init_logit_bias,
        localization_tau=preset.loss.localization_tau,
        label_head=preset.loss.label_head_weight > 0,
        label_head_input=preset.loss.label_head_input,
    )
