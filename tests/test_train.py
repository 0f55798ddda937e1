"""Training: a short overfit lowers every loss, resume continues bit for bit, and gradient
accumulation with gathered embeddings equals one big batch."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from engines.data.labels import LABELS
from engines.datasets import (
    ManifestDataset,
    RadFinderDataset,
    Sample,
    SyntheticDataset,
    TextEncoder,
    collate,
    open_dataset,
)
from engines.losses import RadFinderLoss, siglip_loss
from engines.manifest import ManifestRow, Snippet, save_npz_volume
from engines.model import TextTower, build_model
from engines.presets import (
    TINY,
    AugmentConfig,
    Preset,
    override,
)
from engines.training import DepthPrior, WarmupCosine, load_checkpoint, step_loss_config, train
from engines.training.loop import StepContext, train_step
from model_fixtures import MICRO as SHARED_MICRO

# The tiny preset's design on a toy grid: 8 depth tokens of 12 mm, 32 x 32 pixels of 10 mm.
# With the tiny preset's BatchNorm neck (the shared MICRO has none: other tests train it with
# batches of one, which BatchNorm cannot normalise).
MICRO: Preset = dataclasses.replace(
    SHARED_MICRO,
    model=dataclasses.replace(SHARED_MICRO.model, feature_norm=TINY.model.feature_norm),
    optim=dataclasses.replace(TINY.optim, lr=3e-3, batch_size=8, accum_steps=1),
)


class FixedSamples(RadFinderDataset):
    """Samples made once and served from memory, so a test pays for the phantoms once."""

    def __init__(self, samples: list[Sample]) -> None:
        super().__init__(MICRO.space, max_shift=(0, 0, 0))
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def label_matrix(self) -> npt.NDArray[np.int64]:
        return np.stack([s.labels.numpy() for s in self.samples]).astype(np.int64)

    def texts(self) -> list[str]:
        return [s.report for s in self.samples] + [t for s in self.samples for t in s.snippets]

    def provenance(self) -> dict[str, Any]:
        return {"kind": "fixed-test-samples", "n_volumes": len(self.samples)}


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    ds = SyntheticDataset(MICRO.space, 8, seed=1, fresh_each_epoch=False, max_shift=(0, 0, 0))
    out = [ds[i] for i in range(len(ds))]
    assert sum(len(s.snippets) for s in out) >= 8, "the overfit needs snippets to localize"
    return out


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_overfit_lowers_every_loss(tmp_path: Path, tower: TextTower, samples: list[Sample]) -> None:
    result = train(
        MICRO,
        FixedSamples(samples),
        tmp_path / "run",
        steps=20,
        seed=0,
        progress=False,
        checkpoint_every=10,
        warmup_steps=2,
        text_tower=tower,
    )
    rows = metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 21))
    first = rows[0]
    last = np.mean([[r[k] for k in ("siglip", "prompt", "localization")] for r in rows[-3:]], 0)
    for k, v in zip(("siglip", "prompt", "localization"), last, strict=True):
        assert v < first[k], f"{k} did not go down: {first[k]:.3f} -> {v:.3f}"
    assert last[0] < 0.6 * first["siglip"]
    # Below the constant solution (every pair equally similar, the best such bias), the value a
    # collapsed image tower settles at: log B + (B - 1) log(B / (B - 1)), 3.01 for these 8.
    b = len(samples)
    assert last[0] < 0.75 * (math.log(b) + (b - 1) * math.log(b / (b - 1)))
    assert np.mean([r["img_cos"] for r in rows[-3:]]) < 0.5, "image embeddings collapsed"
    for key in ("lr", "t", "b", "samples_per_s", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    run = tmp_path / "run"
    assert (run / "loss_curves.png").stat().st_size > 1000
    assert (run / "checkpoints" / "step-0000010.pt").exists()
    prior = json.loads((run / "depth_prior.json").read_text())
    assert 0.0 <= prior["overall"]["mean"] <= 1.0 and prior["overall"]["n"] > 0
    ck = load_checkpoint(result.checkpoint)
    assert ck["step"] == 20 and not any(k.startswith("text.") for k in ck["model"])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(path)["model"])


def test_resume_continues_exactly(tmp_path: Path, tower: TextTower, samples: list[Sample]) -> None:
    data = FixedSamples(samples)
    common: dict[str, Any] = dict(
        steps=4, batch=4, seed=3, progress=False, warmup_steps=1, text_tower=tower
    )
    train(MICRO, data, tmp_path / "a", checkpoint_every=100, **common)
    # Interrupted in the middle of the second epoch (2 steps per epoch), then resumed.
    train(MICRO, data, tmp_path / "b", checkpoint_every=100, stop_after=3, **common)
    assert load_checkpoint(tmp_path / "b")["step"] == 3
    train(MICRO, data, tmp_path / "b", checkpoint_every=100, resume=True, **common)
    a, b = _state(tmp_path / "a" / "checkpoints" / "last.pt"), _state(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = metrics_rows(tmp_path / "a"), metrics_rows(tmp_path / "b")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss", "siglip", "prompt", "localization", "lr"):
            assert x[key] == y[key], (x["step"], key)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("label_head_weight", "label_head_input"),
    [(0.0, "embedding"), (1.0, "embedding"), (1.0, "neck"), (1.0, "neck_pool")],
)
def test_accumulation_with_gathered_embeddings_equals_one_big_batch(
    tower: TextTower, samples: list[Sample], label_head_weight: float, label_head_input: str
) -> None:
    # Exact only without the BN neck: BatchNorm normalises each micro-batch by its own
    # statistics, so a neck makes accumulation an approximation (the paper preset has none).
    preset = dataclasses.replace(MICRO, model=dataclasses.replace(MICRO.model, feature_norm="none"))
    preset = override(preset, "loss.label_head_weight", label_head_weight)
    preset = override(preset, "loss.label_head_input", label_head_input)
    torch.manual_seed(0)
    model = build_model(preset, text_tower=tower)
    batch = collate(samples)
    ds = FixedSamples(samples)
    from engines.losses import positive_weights

    criterion = RadFinderLoss(step_loss_config(preset), positive_weights(ds.label_matrix()))
    text = TextEncoder(model)
    text.warm(ds.texts())

    def run(accum: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        ctx = StepContext(
            model=model,
            criterion=criterion,
            text=text,
            device=torch.device("cpu"),
            precision="fp32",
            localization=True,
            generator=torch.Generator().manual_seed(7),
            prompt_features=text.prompt_features(),
        )
        losses = train_step(ctx, batch, accum)
        return losses, _grads(model)

    big_losses, big = run(1)
    acc_losses, acc = run(4)
    head = label_head_weight > 0  # the supervised label head joins both paths, or neither
    assert ("labels" in big_losses) is head and ("label_head.weight" in big) is head
    for k in ("loss", "siglip", "prompt", "localization", *(["labels"] if head else [])):
        assert acc_losses[k] == pytest.approx(big_losses[k], rel=1e-5, abs=1e-6), k
    assert big.keys() == acc.keys() and len(big) > 10
    for n in big:
        # float32 sums in another order: equal to ~1e-7 of each gradient's size
        err = float((acc[n] - big[n]).norm() / big[n].norm().clamp(min=1e-12))
        assert err < 1e-5, f"{n}: relative difference {err:.2e}"

    # Per-micro-batch SigLIP (no gathered negatives) is another objective once negatives
    # matter (bias 0 instead of the initial -10): the equality above is not a coincidence.
    with torch.no_grad():
        out = model(batch.image, batch.depth_valid, report_features=text(batch.reports))
        zero = torch.zeros(())
        img, rep = out.image_embedding, out.report_embedding
        full = float(siglip_loss(img, rep, model.logit_scale, zero))
        per_micro = np.mean(
            [
                float(
                    siglip_loss(
                        out.image_embedding[i : i + 2],
                        out.report_embedding[i : i + 2],
                        model.logit_scale,
                        zero,
                    )
                )
                for i in range(0, 8, 2)
            ]
        )
    assert abs(per_micro - full) > 0.1


def test_schedule_warmup_then_cosine() -> None:
    s = WarmupCosine(total=100, warmup=10, min_factor=0.01)
    assert s(0) < s(5) < s(9) < s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.505, abs=1e-3)
    assert s(100) == pytest.approx(0.01) and s(200) == pytest.approx(0.01)


def test_step_loss_weights_follow_the_paper_units() -> None:
    from engines.presets import PAPER

    paper = step_loss_config(PAPER)
    assert paper.localization_weight == pytest.approx(0.004 * 256)
    assert paper.prompt_weight == pytest.approx(0.5 * 16 * 256 / 256)
    tiny = step_loss_config(TINY)
    assert (tiny.prompt_weight, tiny.localization_weight) == (1.0, 1.0)
    assert step_loss_config(TINY, localization=False).localization_weight == 0.0


def test_depth_prior_statistics() -> None:
    p = DepthPrior()
    p.add(["Lung nodule", "Lung nodule", None], [0.2, 0.4, 0.9])
    d = p.to_dict()
    assert d["labels"]["Lung nodule"] == {"mean": pytest.approx(0.3), "n": 2}
    # The overall mean (the fallback for snippets without a label) counts every snippet.
    assert d["overall"] == {"mean": pytest.approx(0.5), "n": 3}


def _manifest(tmp_path: Path) -> Path:
    from engines.data.phantoms import generate_phantom
    from engines.manifest import write_manifest

    rows = []
    for i in range(3):
        ph = generate_phantom((30, 40, 40), (4.0, 8.0, 8.0), seed=i, labels=["Lung nodule"])
        f = ph.finding("Lung nodule")
        assert f is not None
        save_npz_volume(tmp_path / f"v{i}.npz", ph.hu.astype(np.float32))
        z = ph.index_to_lps(f.center_voxel)[2]
        rows.append(
            ManifestRow(
                volume_id=f"v{i}",
                volume_path=f"v{i}.npz",
                volume_format="npz",
                spacing=ph.spacing,
                affine=tuple(
                    (float(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in ph.affine
                ),
                report="Findings: a nodule (series 2, image 5).",
                labels=tuple(int(v) for v in ph.labels),
                snippets=(
                    Snippet(text="A nodule (series 2, image 5).", z_mm=z, label="Lung nodule"),
                    Snippet(text="Far away (image 9).", z_mm=z + 5000.0),
                ),
                split="valid" if i == 2 else "train",
            )
        )
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, rows)
    return path


def test_manifest_dataset_targets_follow_flips(tmp_path: Path) -> None:
    path = _manifest(tmp_path)
    plain = open_dataset(path, MICRO.space, split="train")
    assert isinstance(plain, ManifestDataset) and len(plain) == 2
    s = plain[0]
    assert s.snippets == ["A nodule."], "citations stripped, out-of-crop snippet dropped"
    assert s.image.shape == (1, *MICRO.space.shape) and s.labels.shape == (len(LABELS),)
    flipped = ManifestDataset.from_manifest(
        path, MICRO.space, split="train", augment=AugmentConfig(1.0, ("z",)), max_shift=(0, 0, 0)
    )
    f = flipped[0]
    d = MICRO.space.n_depth_tokens
    assert f.snippet_tokens == [d - 1 - s.snippet_tokens[0]]
    assert torch.equal(f.image, s.image.flip(1))
    assert f.snippet_relative_depth == pytest.approx(s.snippet_relative_depth)
    assert len(open_dataset(path, MICRO.space, split="valid")) == 1


def test_synthetic_samples_depend_only_on_seed_epoch_index() -> None:
    a = SyntheticDataset(MICRO.space, 4, seed=2, augment=AugmentConfig(0.5, ("x",)))
    b = SyntheticDataset(MICRO.space, 4, seed=2, augment=AugmentConfig(0.5, ("x",)))
    b.set_epoch(1)
    _ = b[3]  # other samples drawn first change nothing
    b.set_epoch(0)
    assert torch.equal(a[1].image, b[1].image) and a[1].report == b[1].report
    a.set_epoch(1)
    assert a[1].report != b[1].report, "a fresh patient every epoch"


def test_batch_split_keeps_snippets_with_their_volume(samples: list[Sample]) -> None:
    batch = collate(samples)
    parts = batch.split(4)
    assert sum(len(p.snippets) for p in parts) == len(batch.snippets)
    for k, p in enumerate(parts):
        for j, vi in enumerate(p.snippet_batch_index.tolist()):
            assert p.snippets[j] in samples[2 * k + vi].snippets
    with pytest.raises(ValueError):
        batch.split(3)


# MICRO with the tiny preset's kind of stem: HU ramps averaged over (3, 2, 2) cells, and the
# cell maximum and minimum of one each.
STEMMED: Preset = dataclasses.replace(
    MICRO,
    model=dataclasses.replace(
        MICRO.model,
        backbone=dataclasses.replace(
            MICRO.model.backbone,
            input_windows=((-1000.0, -700.0), (-700.0, -100.0), (-100.0, 100.0)),
            stem_pool=(3, 2, 2),
            inplane_grid=(2, 2),
            stem_skip=True,
            stem_max_windows=(2,),
            stem_min_windows=(0,),
        ),
    ),
)


def test_cached_stem_is_the_stem_of_each_augmented_sample(tmp_path: Path) -> None:
    """The cache crops a once-computed canvas; that must equal preprocessing each shifted,
    flipped sample and running the stem on it. The manifest's volumes are 30 x 40 x 40 at
    4 x 8 x 8 mm, so this goes through cropping and in-plane resampling, not just a copy."""
    from engines.manifest import load_volume
    from engines.model.stem import HistogramStem
    from engines.preprocess import to_model_space

    path = _manifest(tmp_path)
    stem = HistogramStem.of_preset(STEMMED.model.backbone, STEMMED.space)
    assert stem is not None and stem.channels == 6
    ds = open_dataset(
        path,
        STEMMED.space,
        split="train",
        augment=AugmentConfig(0.5, ("z", "y", "x")),
        max_shift=(6, 4, 4),
        volume_cache=tmp_path / "vc",
        stem=stem,
    )
    assert isinstance(ds, ManifestDataset) and ds.stem_cache is not None
    done: list[int] = []
    assert ds.fill_caches(2, lambda k, n: done.append(k)) == len(ds) and done[-1] == len(ds)
    assert len(list(ds.stem_cache.directory.glob("*.npy"))) == len(ds), "one canvas per volume"
    seen_shift, seen_flip = [False] * 3, [False] * 3
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            shift, flip = ds.augmentation(i)
            q = ds.stem_cache.quantize(shift)
            assert all(s % p == 0 for s, p in zip(q, stem.pool, strict=True))
            row = ds.rows[i]
            hu = load_volume(row, ds.base_dir).hu
            affine = np.asarray(row.affine, dtype=np.float64)
            mi = to_model_space(hu, row.spacing, affine, config=STEMMED.space, shift=q, flip=flip)
            expected = stem.apply(mi.image[None])[0]
            got = ds[i]
            assert got.image.shape == expected.shape == stem.output_shape(STEMMED.space.shape)
            torch.testing.assert_close(got.image, expected, atol=1e-6, rtol=0)
            assert torch.equal(got.depth_valid, mi.depth_valid)
            seen_shift = [a or s != 0 for a, s in zip(seen_shift, q, strict=True)]
            seen_flip = [a or f for a, f in zip(seen_flip, flip, strict=True)]
    assert all(seen_shift) and all(seen_flip), (seen_shift, seen_flip)
    assert ds.provenance()["stem_cache"]["margin"] == [6, 4, 4]


def test_stem_caches_of_different_stems_never_share_a_directory(tmp_path: Path) -> None:
    """A stem with cell extremes has more channels; reading another stem's canvases would
    hand the backbone the wrong input."""
    from engines.datasets import StemCache
    from engines.model.stem import HistogramStem

    stem = HistogramStem.of_preset(STEMMED.model.backbone, STEMMED.space)
    assert stem is not None
    variants = [
        stem,
        dataclasses.replace(stem, max_channels=(), min_channels=()),
        dataclasses.replace(stem, min_channels=()),
        dataclasses.replace(stem, max_channels=()),
        dataclasses.replace(stem, pool=(3, 4, 4)),
    ]
    dirs = {StemCache(tmp_path, v, STEMMED.space, (6, 4, 4)).directory for v in variants}
    assert len(dirs) == len(variants)


def test_training_feeds_cached_stems_to_the_backbone(tmp_path: Path, tower: TextTower) -> None:
    """With a volume cache, ``train`` hands the CNN its stems instead of volumes, and the model
    reads both the same way (serving keeps sending volumes)."""
    from engines.model.vision import CNNBackbone

    path = _manifest(tmp_path)
    train(
        STEMMED,
        path,
        tmp_path / "run",
        steps=2,
        batch=2,
        seed=0,
        progress=False,
        text_tower=tower,
        volume_cache=tmp_path / "vc",
    )
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["data"]["stem_cache"]["shift"] == "whole cells"
    assert len(list((tmp_path / "vc").glob("stem-*/*.npy"))) == 2
    backbone = CNNBackbone(STEMMED.model.backbone, STEMMED.space).eval()
    x = torch.rand(2, 1, *STEMMED.space.shape)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), backbone(backbone.stem.apply(x)))
