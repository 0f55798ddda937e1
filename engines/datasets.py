"""Datasets for training and evaluation: manifest rows, CT-RATE, and phantoms made on the fly.

Every sample goes through ``engines.preprocess.to_model_space``, the one preprocessing that
serving also uses, so a model can never be trained on a geometry it is not served with. The
augmentations (flips per the preset, whole-voxel shifts of the crop window) are arguments of
that same function; it records them in the sample's ``ModelSpace``, and the depth target of
every snippet is computed *after* them from that record, so a flipped or shifted volume keeps
correct targets. Snippets whose cited slice falls outside the crop (or in padding) are dropped:
there is nothing to point at.

Randomness is a pure function of ``(seed, epoch, index)`` (``numpy.random.SeedSequence``), never
of the worker process or of how many samples came before: the classic bug of forked DataLoader
workers sharing one RNG state cannot happen, a run gives the same samples for any number of
workers, and a resumed run sees exactly the samples the interrupted one would have seen.

Text. Snippets are passed through ``strip_citations`` (a snippet that still says "image 45"
could be localised by reading the number); reports are used as written (the global SigLIP loss
has no depth to cheat on). ``TextEncoder`` turns texts into pooled text-tower features: through
a ``TextFeatureCache`` when the preset freezes the tower (each distinct text embedded once),
through the trainable tower otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset

from engines.data.labels import LABELS
from engines.manifest import ManifestRow, Snippet, load_volume, read_ctrate, read_manifest
from engines.model.radfinder import RadFinder
from engines.model.stem import HistogramStem
from engines.model.text import TextFeatureCache, strip_citations
from engines.preprocess import ModelSpace, to_model_space
from engines.presets import AugmentConfig, IntTriple, ModelSpaceConfig

__all__ = [
    "Batch",
    "ManifestDataset",
    "RadFinderDataset",
    "Sample",
    "StemCache",
    "SyntheticDataset",
    "TextEncoder",
    "collate",
    "default_max_shift",
    "open_dataset",
    "relative_depth",
    "sample_seed",
]

_AXES: Final = ("z", "y", "x")
# Salts keep the augmentation stream apart from the phantom stream of the same (epoch, index).
_SALT_AUGMENT: Final = 0x41554731
_SALT_PHANTOM: Final = 0x50484E54


def _split_salt(split: str) -> int:
    """Phantom stream of a split: training and validation patients never coincide, whatever
    seeds the two sets were drawn with."""
    if split == "train":
        return _SALT_PHANTOM
    return _SALT_PHANTOM ^ int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "big")


def sample_seed(seed: int, epoch: int, index: int, salt: int = 0) -> int:
    """A 32-bit seed for one sample: independent streams, stable across runs and workers."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(salt)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def default_max_shift(space: ModelSpaceConfig) -> tuple[int, int, int]:
    """Largest crop shift (voxels per axis) used when a dataset is not told otherwise.

    Presets carry no shift (only flips), so this is a fixed fraction: 1/16 of each axis, about
    2.5 cm in every direction for ``tiny``. Large enough that the model cannot learn an
    absolute-position shortcut for depth, small enough that the chest stays in the crop.
    """
    return (space.shape[0] // 16, space.shape[1] // 16, space.shape[2] // 16)


# ---------------------------------------------------------------------------------------------
# Samples and batches


@dataclass
class Sample:
    """One preprocessed volume with its texts and targets.

    ``image [1, Z, Y, X]`` in model space; ``depth_valid [D]``; ``labels [L]`` in {1, 0, -1};
    per kept snippet its citation-stripped text, the depth token holding the cited z, the z
    in mm and the label it belongs to (if known). ``snippet_relative_depth`` is where the cited
    z lies between the lowest and highest valid depth (0 = inferior end, 1 = superior end),
    independent of flips: the statistic behind the label-prior baseline.
    """

    index: int
    volume_id: str
    image: torch.Tensor
    depth_valid: torch.Tensor
    labels: torch.Tensor
    report: str
    space: ModelSpace
    snippets: list[str] = field(default_factory=list)
    snippet_tokens: list[int] = field(default_factory=list)
    snippet_z_mm: list[float] = field(default_factory=list)
    snippet_labels: list[str | None] = field(default_factory=list)
    snippet_relative_depth: list[float] = field(default_factory=list)


@dataclass
class Batch:
    """Samples stacked for the model; snippets flattened with the index of their volume."""

    image: torch.Tensor
    depth_valid: torch.Tensor
    labels: torch.Tensor
    reports: list[str]
    snippets: list[str]
    snippet_batch_index: torch.Tensor
    snippet_target: torch.Tensor
    snippet_z_mm: list[float]
    snippet_labels: list[str | None]
    snippet_relative_depth: list[float]
    volume_ids: list[str]
    indices: list[int]
    spaces: list[ModelSpace]

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            image=self.image.to(device, non_blocking=non_blocking),
            depth_valid=self.depth_valid.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            snippet_batch_index=self.snippet_batch_index.to(device, non_blocking=non_blocking),
            snippet_target=self.snippet_target.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU
        asynchronously."""
        return replace(
            self,
            image=self.image.pin_memory(),
            depth_valid=self.depth_valid.pin_memory(),
            labels=self.labels.pin_memory(),
            snippet_batch_index=self.snippet_batch_index.pin_memory(),
            snippet_target=self.snippet_target.pin_memory(),
        )

    def split(self, n: int) -> list[Batch]:
        """``n`` micro-batches of equal size (gradient accumulation); snippets follow their
        volume and are re-indexed within the micro-batch."""
        b = len(self)
        if n < 1 or b % n:
            raise ValueError(f"cannot split a batch of {b} into {n} equal micro-batches")
        size = b // n
        out: list[Batch] = []
        sbi = self.snippet_batch_index
        for k in range(n):
            lo, hi = k * size, (k + 1) * size
            keep = ((sbi >= lo) & (sbi < hi)).nonzero().flatten()
            ki = keep.tolist()
            out.append(
                Batch(
                    image=self.image[lo:hi],
                    depth_valid=self.depth_valid[lo:hi],
                    labels=self.labels[lo:hi],
                    reports=self.reports[lo:hi],
                    snippets=[self.snippets[i] for i in ki],
                    snippet_batch_index=sbi[keep] - lo,
                    snippet_target=self.snippet_target[keep],
                    snippet_z_mm=[self.snippet_z_mm[i] for i in ki],
                    snippet_labels=[self.snippet_labels[i] for i in ki],
                    snippet_relative_depth=[self.snippet_relative_depth[i] for i in ki],
                    volume_ids=self.volume_ids[lo:hi],
                    indices=self.indices[lo:hi],
                    spaces=self.spaces[lo:hi],
                )
            )
        return out


def collate(samples: Sequence[Sample]) -> Batch:
    """DataLoader ``collate_fn``: stack images, flatten snippets."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    sbi: list[int] = []
    for i, s in enumerate(samples):
        sbi += [i] * len(s.snippets)
    return Batch(
        image=torch.stack([s.image for s in samples]),
        depth_valid=torch.stack([s.depth_valid for s in samples]),
        labels=torch.stack([s.labels for s in samples]),
        reports=[s.report for s in samples],
        snippets=[t for s in samples for t in s.snippets],
        snippet_batch_index=torch.tensor(sbi, dtype=torch.long),
        snippet_target=torch.tensor(
            [t for s in samples for t in s.snippet_tokens], dtype=torch.long
        ),
        snippet_z_mm=[z for s in samples for z in s.snippet_z_mm],
        snippet_labels=[lb for s in samples for lb in s.snippet_labels],
        snippet_relative_depth=[r for s in samples for r in s.snippet_relative_depth],
        volume_ids=[s.volume_id for s in samples],
        indices=[s.index for s in samples],
        spaces=[s.space for s in samples],
    )


def relative_depth(space: ModelSpace, z_mm: float) -> float:
    """Where patient z lies between the centres of the lowest and highest valid depth token
    (0 inferior, 1 superior), whichever way the model axis runs; clipped to [0, 1]."""
    valid = np.flatnonzero(space.depth_valid)
    if valid.size == 0:
        return 0.5
    za = space.token_to_z_mm(float(valid[0]))
    zb = space.token_to_z_mm(float(valid[-1]))
    lo, hi = min(za, zb), max(za, zb)
    if hi - lo < 1e-9:
        return 0.5
    return float(min(max((z_mm - lo) / (hi - lo), 0.0), 1.0))


def _make_sample(
    index: int,
    volume_id: str,
    hu: npt.NDArray[np.float32],
    spacing: Sequence[float],
    affine: npt.NDArray[np.float64] | None,
    report: str,
    labels: Sequence[int],
    snippets: Iterable[Snippet],
    config: ModelSpaceConfig,
    shift: Sequence[int],
    flip: Sequence[bool],
) -> Sample:
    """The one path from a HU volume and its texts to a training/evaluation sample."""
    mi = to_model_space(hu, spacing, affine, config=config, shift=shift, flip=flip)
    space = mi.space
    sample = Sample(
        index=index,
        volume_id=volume_id,
        image=mi.image,
        depth_valid=mi.depth_valid,
        labels=torch.tensor(list(labels), dtype=torch.long),
        report=report,
        space=space,
    )
    for sn in snippets:
        token = space.depth_token_at(sn.z_mm)
        text = strip_citations(sn.text)
        if token is None or not text:
            continue
        sample.snippets.append(text)
        sample.snippet_tokens.append(int(token))
        sample.snippet_z_mm.append(float(sn.z_mm))
        sample.snippet_labels.append(sn.label)
        sample.snippet_relative_depth.append(relative_depth(space, sn.z_mm))
    return sample


# ---------------------------------------------------------------------------------------------
# Datasets


class RadFinderDataset(Dataset[Sample], ABC):
    """Common ground of the datasets: model space, augmentation, epochs, provenance."""

    def __init__(
        self,
        space: ModelSpaceConfig,
        *,
        augment: AugmentConfig | None = None,
        max_shift: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.space = space
        self.augment = augment
        shift = default_max_shift(space) if max_shift is None else tuple(max_shift)
        if len(shift) != 3 or min(shift) < 0:
            raise ValueError(f"max_shift must be 3 non-negative voxel counts, got {max_shift}")
        self.max_shift = (int(shift[0]), int(shift[1]), int(shift[2]))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Augmentations (and fresh phantoms) depend on the epoch; the trainer sets it."""
        self.epoch = int(epoch)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Sample: ...

    def augmentation(self, index: int) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
        """``(shift, flip)`` for a sample: none without ``augment``."""
        if self.augment is None:
            return (0, 0, 0), (False, False, False)
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, index, _SALT_AUGMENT))
        flip = tuple(
            bool(ax in self.augment.flip_axes and rng.random() < self.augment.flip_prob)
            for ax in _AXES
        )
        shift = tuple(int(rng.integers(-m, m + 1)) if m > 0 else 0 for m in self.max_shift)
        return (shift[0], shift[1], shift[2]), (flip[0], flip[1], flip[2])

    @abstractmethod
    def label_matrix(self) -> npt.NDArray[np.int64]:
        """Labels ``[N, L]`` of the whole set (for ``positive_weights``), without pixels."""

    def texts(self) -> list[str]:
        """Every report and (stripped) snippet text, to warm a text-feature cache; empty when
        the texts are not known in advance (phantoms made on the fly)."""
        return []

    @abstractmethod
    def provenance(self) -> dict[str, Any]: ...


def volume_identity(row: ManifestRow, base_dir: Path | None) -> str:
    """The resolved path with its size and modification time (and how it is rescaled): a
    changed file gets a new identity, so caches keyed by it are never stale."""
    path = Path(row.volume_path)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{row.rescale}"


def _cache_file(directory: Path, identity: str) -> Path:
    return directory / (hashlib.sha1(identity.encode()).hexdigest() + ".npy")


def _save_atomic(path: Path, array: npt.NDArray[Any]) -> None:
    """Write to a temporary name and rename, so that data-loader workers filling a cache
    concurrently never read a partial file."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class DecodedVolumeCache:
    """HU volumes decoded once and kept as raw ``.npy`` files that later epochs memory-map.

    Decompressing a ``.nii.gz`` costs as much as the whole preprocessing of a tiny-preset
    sample; a run of many epochs over a few thousand volumes pays it once per volume instead
    of once per step. Integral HU (every synthetic and nearly every real CT) is stored as int16,
    which is lossless; anything else as float32. Files are written to a temporary name and
    renamed, so data-loader workers filling the cache concurrently never read a partial file.
    The key is the resolved path with its size and modification time, so a changed volume is
    decoded again.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, identity: str) -> Path:
        """Where the volume of ``identity`` (``volume_identity``) is kept."""
        return _cache_file(self.directory, identity)

    def get(self, row: ManifestRow, base_dir: Path | None) -> npt.NDArray[np.float32]:
        path = self.path(volume_identity(row, base_dir))
        if path.exists():
            cached: npt.NDArray[np.float32] = np.load(path, mmap_mode="r").astype(np.float32)
            return cached
        hu = load_volume(row, base_dir).hu
        stored: npt.NDArray[Any] = hu
        if hu.size and float(np.abs(hu).max()) < 32767 and np.array_equal(hu, np.rint(hu)):
            stored = hu.astype(np.int16)
        _save_atomic(path, stored)
        return hu


class StemCache:
    """The fixed stem of the tiny backbone (``engines.model.stem``) per training volume,
    computed once and kept as ``.npy`` on a canvas wide enough for every crop shift.

    The stem has no weights, yet recomputing it costs ~40% of a tiny training step on a CPU
    (12 full-resolution channels). Here it is computed once per volume on the model-space
    grid enlarged by ``margin`` voxels on each side; a sample's crop shift then selects whole
    stem cells of that canvas and a flip mirrors them. That equals the stem of the sample
    ``to_model_space`` gives with the same shift and flip exactly (the resampled grid is
    centred the same way, resampling is per voxel position, padding is 0, and the cells
    tile the crop), provided the shift is a whole number of cells: ``quantize`` rounds the
    augmentation's shifts to cells, which only coarsens the augmentation (the tiny preset's
    +-6/8/8 voxels become +-2 cells of 12/10/10 mm).
    """

    def __init__(
        self,
        directory: str | Path,
        stem: HistogramStem,
        space: ModelSpaceConfig,
        max_shift: Sequence[int],
    ) -> None:
        self.stem = stem
        # The depth margin is also a whole number of depth tokens, so the canvas is a valid
        # model space (the stem pool's depth divides a token).
        unit = (space.slices_per_token, stem.pool[1], stem.pool[2])
        self.margin: IntTriple = (
            math.ceil(max_shift[0] / unit[0]) * unit[0],
            math.ceil(max_shift[1] / unit[1]) * unit[1],
            math.ceil(max_shift[2] / unit[2]) * unit[2],
        )
        canvas_shape = tuple(n + 2 * m for n, m in zip(space.shape, self.margin, strict=True))
        self.canvas = replace(space, shape=(canvas_shape[0], canvas_shape[1], canvas_shape[2]))
        self.cells = stem.output_shape(space.shape)[1:]
        stem.output_shape(self.canvas.shape)
        stem_spec: list[Any] = [stem.scale, stem.shift, stem.pool]
        if stem.max_channels or stem.min_channels:
            # Only then, so that caches of stems without cell extremes keep their names.
            stem_spec += [stem.max_channels, stem.min_channels]
        spec = {
            "stem": stem_spec,
            "canvas": [self.canvas.shape, self.canvas.spacing_mm, self.canvas.hu_window],
        }
        tag = hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:12]
        self.directory = Path(directory) / f"stem-{tag}"
        self.directory.mkdir(parents=True, exist_ok=True)

    def quantize(self, shift: Sequence[int]) -> IntTriple:
        """The nearest whole-cell shift within the margin."""
        out = []
        for s, p, m in zip(shift, self.stem.pool, self.margin, strict=True):
            out.append(max(-m, min(m, round(s / p) * p)))
        return (out[0], out[1], out[2])

    def path(self, identity: str) -> Path:
        return _cache_file(self.directory, identity)

    def canvas_stem(
        self, identity: str, volume: Callable[[ModelSpaceConfig], torch.Tensor]
    ) -> npt.NDArray[np.float32]:
        """``[C, *canvas cells]`` for the volume named ``identity``; ``volume(config)`` gives
        its ``[1, Z, Y, X]`` model-space image on ``config``, called only on a miss."""
        path = self.path(identity)
        if path.exists():
            cached: npt.NDArray[np.float32] = np.load(path, mmap_mode="r")
            return cached
        with torch.no_grad():
            out = self.stem.apply(volume(self.canvas)[None])[0].numpy()
        _save_atomic(path, out)
        return out

    def crop(
        self, canvas: npt.NDArray[np.float32], shift: Sequence[int], flip: Sequence[bool]
    ) -> torch.Tensor:
        """The stem of the sample cropped with ``shift`` (whole cells) and ``flip``."""
        index: list[slice] = [slice(None)]
        for s, m, p, n in zip(shift, self.margin, self.stem.pool, self.cells, strict=True):
            if s % p:
                raise ValueError(f"shift {tuple(shift)} is not whole stem cells {self.stem.pool}")
            start = (m + s) // p
            index.append(slice(start, start + n))
        out = canvas[tuple(index)]
        axes = tuple(1 + d for d in range(3) if flip[d])
        if axes:
            out = np.flip(out, axis=axes)
        # Always a copy: the canvas is a read-only memory map of the cache file.
        return torch.from_numpy(np.array(out, dtype=np.float32))


class ManifestDataset(RadFinderDataset):
    """Rows of a training manifest or of CT-RATE (``read_ctrate`` gives the same rows)."""

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        space: ModelSpaceConfig,
        *,
        base_dir: str | Path | None = None,
        augment: AugmentConfig | None = None,
        max_shift: Sequence[int] | None = None,
        seed: int = 0,
        source: Mapping[str, Any] | None = None,
        volume_cache: str | Path | None = None,
        stem: HistogramStem | None = None,
    ) -> None:
        super().__init__(space, augment=augment, max_shift=max_shift, seed=seed)
        self.volume_cache = None if volume_cache is None else DecodedVolumeCache(volume_cache)
        # With a stem (and a cache folder to keep it in), samples carry the stem of their
        # volume instead of the volume: what a CNN backbone with that stem computes first.
        self.stem_cache: StemCache | None = None
        if stem is not None and volume_cache is not None:
            self.stem_cache = StemCache(volume_cache, stem, space, self.max_shift)
        self.rows = list(rows)
        if not self.rows:
            raise ValueError("the dataset has no rows")
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.source = dict(source or {"kind": "rows"})

    @classmethod
    def from_manifest(
        cls,
        path: str | Path,
        space: ModelSpaceConfig,
        *,
        split: str | None = None,
        **kwargs: Any,
    ) -> ManifestDataset:
        """A JSON Lines manifest; ``split`` keeps only rows of that split (rows without a
        split are kept)."""
        p = Path(path)
        rows = [r for r in read_manifest(p) if split is None or r.split in (None, split)]
        source = {"kind": "manifest", "path": str(p.resolve()), "sha256": sha256_file(p)}
        if split is not None:
            source["split"] = split
        return cls(rows, space, base_dir=p.parent, source=source, **kwargs)

    @classmethod
    def from_ctrate(
        cls, root: str | Path, space: ModelSpaceConfig, *, split: str = "train", **kwargs: Any
    ) -> ManifestDataset:
        rows = list(read_ctrate(root, split))
        source = {"kind": "ctrate", "path": str(Path(root).resolve()), "split": split}
        return cls(rows, space, source=source, **kwargs)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        if self.volume_cache is not None:
            hu = self.volume_cache.get(row, self.base_dir)
        else:
            hu = load_volume(row, self.base_dir).hu
        shift, flip = self.augmentation(index)
        if self.stem_cache is not None:
            shift = self.stem_cache.quantize(shift)
        affine = None if row.affine is None else np.asarray(row.affine, dtype=np.float64)
        sample = _make_sample(
            index,
            row.volume_id,
            hu,
            row.spacing,
            affine,
            row.report,
            row.labels,
            row.snippets,
            self.space,
            shift,
            flip,
        )
        if self.stem_cache is not None:
            sample.image = self.stem_cache.crop(self._canvas(row, hu), shift, flip)
        return sample

    def _canvas(self, row: ManifestRow, hu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        assert self.stem_cache is not None
        affine = None if row.affine is None else np.asarray(row.affine, dtype=np.float64)
        return self.stem_cache.canvas_stem(
            volume_identity(row, self.base_dir),
            lambda config: to_model_space(hu, row.spacing, affine, config=config).image,
        )

    def fill_caches(
        self, workers: int = 1, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Decode every volume (and compute its stem) into the caches now, in ``workers``
        processes, rather than in the first epoch's loader; ``progress(done, total)`` after
        each chunk. Returns the number of rows."""
        if self.volume_cache is None:
            return 0
        n = len(self.rows)
        chunks = [list(range(i, min(i + 32, n))) for i in range(0, n, 32)]
        done = 0
        if workers <= 1:
            for chunk in chunks:
                _fill(self, chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, n)
            return n
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: a process that has run torch ops holds OpenMP thread pools, and a
        # forked child that uses torch can deadlock on them.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = {pool.submit(_fill, self, chunk): len(chunk) for chunk in chunks}
            for fut in as_completed(futures):
                fut.result()
                done += futures[fut]
                if progress is not None:
                    progress(done, n)
        return n

    def label_matrix(self) -> npt.NDArray[np.int64]:
        return np.array([r.labels for r in self.rows], dtype=np.int64)

    def texts(self) -> list[str]:
        out = [r.report for r in self.rows]
        out += [t for r in self.rows for t in (strip_citations(s.text) for s in r.snippets) if t]
        return list(dict.fromkeys(out))

    def provenance(self) -> dict[str, Any]:
        out = {**self.source, "n_volumes": len(self.rows), "seed": self.seed}
        if self.stem_cache is not None:
            out["stem_cache"] = {"margin": list(self.stem_cache.margin), "shift": "whole cells"}
        return out


def _fill(dataset: ManifestDataset, indices: Sequence[int]) -> None:
    vc, sc = dataset.volume_cache, dataset.stem_cache
    assert vc is not None
    for i in indices:
        row = dataset.rows[i]
        ident = volume_identity(row, dataset.base_dir)
        if vc.path(ident).exists() and (sc is None or sc.path(ident).exists()):
            continue
        hu = vc.get(row, dataset.base_dir)
        if sc is not None:
            dataset._canvas(row, hu)


def sha256_file(path: Path) -> str:
    """Content hash for provenance (manifests, bundle files)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def generator_version() -> str:
    """A fingerprint of the synthetic-world source (phantoms, findings, anatomy, reports): the
    generator has no version number, and a changed generator must not pass for the old one."""
    import engines.data as data_pkg

    root = Path(data_pkg.__file__).parent
    h = hashlib.sha256()
    for name in ("phantoms.py", "findings.py", "anatomy.py", "raster.py", "reports.py"):
        p = root / name
        if p.exists():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


class SyntheticDataset(RadFinderDataset):
    """Phantoms and their reports generated when asked for (``generate_phantom`` +
    ``write_report``): unlimited data whose every label and citation is true.

    ``length`` samples per epoch. With ``fresh_each_epoch`` sample ``i`` of epoch ``e`` is
    patient ``(seed, e, i)``, so no volume repeats across epochs; without it the set is fixed
    (patients ``(seed, 0, i)``) and only the augmentation changes, which is what an overfit
    test or a fixed validation set needs. ``split`` selects an independent stream of patients,
    so a ``"valid"`` set never contains a ``"train"`` patient. The phantom is rendered on
    ``native_shape`` / ``native_spacing`` (default: the model space itself, so resampling is
    nearly the identity).
    """

    def __init__(
        self,
        space: ModelSpaceConfig,
        length: int,
        *,
        seed: int = 0,
        fresh_each_epoch: bool = True,
        native_shape: Sequence[int] | None = None,
        native_spacing: Sequence[float] | None = None,
        phantom_config: Any = None,
        augment: AugmentConfig | None = None,
        max_shift: Sequence[int] | None = None,
        cite_probability: float = 0.9,
        language: str = "en",
        split: str = "train",
    ) -> None:
        super().__init__(space, augment=augment, max_shift=max_shift, seed=seed)
        self.split = split
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.length = int(length)
        self.fresh_each_epoch = bool(fresh_each_epoch)
        shape = tuple(space.shape if native_shape is None else native_shape)
        spacing = tuple(space.spacing_mm if native_spacing is None else native_spacing)
        self.native_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.native_spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        self.phantom_config = phantom_config
        self.cite_probability = float(cite_probability)
        self.language = language

    def __len__(self) -> int:
        return self.length

    def patient_seed(self, index: int) -> int:
        epoch = self.epoch if self.fresh_each_epoch else 0
        return sample_seed(self.seed, epoch, index, _split_salt(self.split))

    def __getitem__(self, index: int) -> Sample:
        from engines.data.phantoms import generate_phantom
        from engines.data.reports import write_report

        pseed = self.patient_seed(index)
        phantom = generate_phantom(
            self.native_shape, self.native_spacing, seed=pseed, config=self.phantom_config
        )
        rng = random.Random(pseed)
        n = int(phantom.hu.shape[0])
        top_first = rng.random() < 0.5
        labels = [int(v) for v in np.asarray(phantom.labels).reshape(-1)]
        report = write_report(
            phantom.findings,
            seed=pseed,
            n_slices=n,
            series_number=rng.choice((2, 3, 4, 5, 201, 301)),
            instance_number_of_z=(lambda z: n - z) if top_first else (lambda z: z + 1),
            language=self.language,
            present_labels={lb for lb, v in zip(LABELS, labels, strict=True) if v == 1},
            cite_probability=self.cite_probability,
        )
        affine = np.asarray(phantom.affine, dtype=np.float64)
        snippets = [
            Snippet(
                text=c.snippet,
                z_mm=float((affine @ np.array([c.z_index, 0.0, 0.0, 1.0]))[2]),
                label=c.finding_label,
            )
            for c in report.citations
            if c.snippet.strip()
        ]
        shift, flip = self.augmentation(index)
        return _make_sample(
            index,
            f"synthetic-{self.seed}-{pseed:08x}",
            phantom.hu,
            phantom.spacing,
            affine,
            report.text,
            labels,
            snippets,
            self.space,
            shift,
            flip,
        )

    def label_matrix(self) -> npt.NDArray[np.int64]:
        """Expected labels: the phantom prevalences, as a 1000-patient table drawn with a
        fixed seed (the actual patients are only known once rendered)."""
        from engines.data.phantoms import PhantomConfig, sample_labels

        config = self.phantom_config if self.phantom_config is not None else PhantomConfig()
        rng = np.random.default_rng(self.seed)
        out = np.zeros((1000, len(LABELS)), dtype=np.int64)
        for i in range(out.shape[0]):
            present = set(sample_labels(rng, config))
            out[i] = [1 if lb in present else 0 for lb in LABELS]
        return out

    def provenance(self) -> dict[str, Any]:
        return {
            "kind": "synthetic",
            "split": self.split,
            "length": self.length,
            "seed": self.seed,
            "fresh_each_epoch": self.fresh_each_epoch,
            "native_shape": list(self.native_shape),
            "native_spacing": list(self.native_spacing),
            "generator_version": generator_version(),
        }


DataSpec = str | Path | RadFinderDataset | Sequence[ManifestRow]


def open_dataset(
    data: DataSpec,
    space: ModelSpaceConfig,
    *,
    split: str = "train",
    augment: AugmentConfig | None = None,
    max_shift: Sequence[int] | None = None,
    seed: int = 0,
    synthetic_length: int = 1000,
    volume_cache: str | Path | None = None,
    stem: HistogramStem | None = None,
) -> RadFinderDataset:
    """What the CLI hands over, as a dataset.

    ``"synthetic"`` or ``"synthetic:N"``: phantoms on the fly (N per epoch; fresh every epoch
    for ``split="train"``, a fixed set otherwise, drawn with ``seed``); a ``.jsonl`` path: a
    training manifest (rows of ``split`` and rows without one); a directory: CT-RATE's
    ``dataset/`` folder (``split`` is ``train`` or ``valid``); rows; or a dataset, returned as is.
    ``volume_cache``: a folder for ``DecodedVolumeCache`` (manifest and CT-RATE data only);
    with ``stem`` also for a ``StemCache``, and samples then carry the stem, not the volume.
    """
    if isinstance(data, RadFinderDataset):
        return data
    if isinstance(data, str) and (data == "synthetic" or data.startswith("synthetic:")):
        n = int(data.split(":", 1)[1]) if ":" in data else synthetic_length
        return SyntheticDataset(
            space,
            n,
            seed=seed,
            fresh_each_epoch=split == "train",
            augment=augment,
            max_shift=max_shift,
            split=split,
        )
    kwargs: dict[str, Any] = {
        "augment": augment,
        "max_shift": max_shift,
        "seed": seed,
        "volume_cache": volume_cache,
        "stem": stem,
    }
    if isinstance(data, str | Path):
        p = Path(data)
        if p.is_dir():
            return ManifestDataset.from_ctrate(p, space, split=split, **kwargs)
        if not p.exists():
            raise FileNotFoundError(f"no manifest or CT-RATE folder at {p}")
        return ManifestDataset.from_manifest(p, space, split=split, **kwargs)
    return ManifestDataset(list(data), space, **kwargs)


# ---------------------------------------------------------------------------------------------
# Text features


class TextEncoder:
    """Pooled text-tower features of the model's tower, cached when the tower is frozen.

    A frozen tower's output never changes, so each distinct text is embedded once
    (``TextFeatureCache``). Texts made on the fly (phantom reports) are mostly unique, so the
    cache is emptied when it passes ``max_cached`` entries instead of growing for ever. A
    trainable tower is run every time, with gradients when asked for.
    """

    def __init__(self, model: RadFinder, *, cache: bool = True, max_cached: int = 200_000) -> None:
        if model.text is None:
            raise ValueError("the model has no text tower; build it with load_text=True")
        self.model = model
        self.tower = model.text
        self.cached = bool(cache and self.tower.frozen)
        self.max_cached = int(max_cached)
        self.cache: TextFeatureCache | None = TextFeatureCache(self.tower) if self.cached else None

    @property
    def trainable(self) -> bool:
        return not self.tower.frozen

    def __call__(self, texts: Sequence[str], *, grad: bool = False) -> torch.Tensor:
        """Features ``[N, H]`` on the tower's device (float32)."""
        device = next(self.tower.parameters()).device
        if not texts:
            return torch.zeros((0, self.tower.hidden_size), device=device)
        if self.cache is not None:
            if len(self.cache) > self.max_cached:
                self.cache = TextFeatureCache(self.tower)
            return self.cache(texts).to(device)
        if grad and self.trainable:
            return self.tower.embed(texts).float()
        with torch.no_grad():
            return self.tower.embed(texts).float()

    def warm(
        self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Embed ``texts`` into the cache ahead of training (no-op without a cache)."""
        if self.cache is None:
            return
        # Shortest first, so that each chunk's batches pad little (TextFeatureCache sorts
        # within a chunk; this sorts across chunks).
        todo = sorted(dict.fromkeys(texts), key=len)
        step = max(self.cache.batch_size * 4, 1)
        for i in range(0, len(todo), step):
            self.cache(todo[i : i + step])
            if progress is not None:
                progress(min(i + step, len(todo)), len(todo))

    def save(self, path: str | Path) -> None:
        if self.cache is not None:
            self.cache.save(path)

    def load(self, path: str | Path) -> None:
        if self.cache is not None and Path(path).exists():
            self.cache.load(path)

    def prompt_features(
        self, labels: Sequence[str] = LABELS, *, grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features ``([L, V, H], [L, V, H])`` of the positive and negative prompts."""
        from engines.model.text import PROMPT_TEMPLATES, disease_prompts

        pos, neg = disease_prompts(labels, PROMPT_TEMPLATES)
        n_l, n_v = len(pos), len(PROMPT_TEMPLATES)
        flat = [t for row in pos for t in row] + [t for row in neg for t in row]
        feats = self(flat, grad=grad)
        p, n = feats[: n_l * n_v], feats[n_l * n_v :]
        return p.reshape(n_l, n_v, -1), n.reshape(n_l, n_v, -1)
