"""Model bundles (DESIGN §3): everything serving needs, in one directory, checked on load.

Layout::

    bundle.toml        name, version, labels with codes, prompts and thresholds,
                       preprocessing (the preset's model space), feature resolution, provenance
    model.pt           weights-only torch checkpoint (the reference runtime, and re-export)
    vision.onnx        volume -> embeddings, probabilities, depth distributions; static shapes,
                       prompt embeddings baked in as constants (serving needs no text tower)
    prompts.npz        the prompt embeddings (per template and template-averaged)
    depth_prior.json   where each finding type is cited on average in the training data
                       (the evaluation's label-prior baseline), when training wrote one

Why each piece. The preset travels as data (``[preset]``), so a served model is preprocessed
with the geometry it was trained on, never with the current code's defaults. Every file is
listed with its SHA-256, so a bundle copied half-way or edited by hand is refused instead of
serving wrong probabilities. Thresholds are chosen per label on a validation split by Youden's
J (the CheXzero protocol the paper reports); without validation data every threshold is 0.5 and
``[thresholds]`` says so, because a silent 0.5 looks like a tuned value.

Codes (``LABEL_CODES``) are those checked against DICOM PS3.16 in ``data/label-codes.md``
(2026-11-27); a label without a published code gets the project's own scheme ``99RADFINDER``
and code ``RF`` + its three-digit position in the CT-RATE label order (``RF006`` is Hiatal
hernia), so the code is stable and derivable. No SNOMED code is invented.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import tomli_w
import torch

from engines.data.labels import LABELS
from engines.datasets import DataSpec, TextEncoder, collate, open_dataset, sha256_file
from engines.evaluation.metrics import youden_threshold
from engines.model.radfinder import PromptEmbeddings, RadFinder, export_vision_onnx
from engines.model.text import PROMPT_TEMPLATES, TextTower, disease_prompts
from engines.presets import Preset, preset_from_dict, preset_to_dict
from engines.training.checkpoint import load_model, save_checkpoint
from engines.training.progress import Progress

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "LABEL_CODES",
    "OWN_SCHEME",
    "Bundle",
    "BundleError",
    "BundleLabel",
    "Code",
    "export_bundle",
    "load_bundle",
]

BUNDLE_FORMAT: Final = "radfinder-bundle"
BUNDLE_VERSION: Final = 1
OWN_SCHEME: Final = "99RADFINDER"
DEFAULT_THRESHOLD: Final = 0.5
MAX_ONNX_DIFF: Final = 1e-4
_CHECKPOINT = "model.pt"
_ONNX = "vision.onnx"
_PROMPTS = "prompts.npz"
_PRIOR = "depth_prior.json"


class BundleError(ValueError):
    """A bundle that must not be served; the message says which file or field."""


@dataclass(frozen=True)
class Code:
    """A coded concept: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def to_dict(self) -> dict[str, str]:
        return {"scheme": self.scheme, "code": self.value, "meaning": self.meaning}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Code:
        return cls(str(d["scheme"]), str(d["code"]), str(d["meaning"]))


def _own(label: str) -> Code:
    return Code(OWN_SCHEME, f"RF{LABELS.index(label) + 1:03d}", label)


_ARTERY = Code("SCT", "51114001", "Artery")
_CORONARY = Code("SCT", "41801008", "Coronary artery")
_LUNG = Code("SCT", "39607008", "Lung")

#: label -> (finding code, finding site or None), from data/label-codes.md.
LABEL_CODES: Final[Mapping[str, tuple[Code, Code | None]]] = {
    "Medical material": (Code("DCM", "111102", "Non-lesion"), None),
    "Arterial wall calcification": (Code("SCT", "237897009", "Vascular Calcification"), _ARTERY),
    "Cardiomegaly": (Code("SCT", "287272002", "Cardiomegaly"), None),
    "Pericardial effusion": (Code("SCT", "373945007", "Pericardial effusion"), None),
    "Coronary artery wall calcification": (
        Code("SCT", "237897009", "Vascular Calcification"),
        _CORONARY,
    ),
    "Hiatal hernia": (_own("Hiatal hernia"), None),
    "Lymphadenopathy": (Code("SCT", "30746006", "Lymphadenopathy"), None),
    "Emphysema": (Code("RADLEX", "RID4799", "emphysema"), None),
    "Atelectasis": (_own("Atelectasis"), None),
    "Lung nodule": (Code("SCT", "27925004", "Nodule"), _LUNG),
    "Lung opacity": (Code("DCM", "112033", "Abnormal opacity"), None),
    "Pulmonary fibrotic sequela": (Code("SCT", "112674009", "Fibrosis"), _LUNG),
    "Pleural effusion": (Code("SCT", "60046008", "Pleural effusion"), None),
    "Mosaic attenuation pattern": (Code("DCM", "112130", "Mosaic pattern"), None),
    "Peribronchial thickening": (_own("Peribronchial thickening"), None),
    "Consolidation": (Code("RADLEX", "RID43255", "consolidation"), None),
    "Bronchiectasis": (_own("Bronchiectasis"), None),
    "Interlobular septal thickening": (Code("DCM", "112114", "Septal line(s)"), None),
}


@dataclass(frozen=True)
class BundleLabel:
    index: int
    name: str
    code: Code
    finding_site: Code | None
    threshold: float
    threshold_method: str
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated bundle. Paths are absolute."""

    path: Path
    name: str
    version: str
    preset: Preset
    labels: tuple[BundleLabel, ...]
    threshold_method: str
    feature_resolution_mm: float
    checkpoint_path: Path
    onnx_path: Path
    prompts_path: Path
    onnx_inputs: tuple[str, ...]
    onnx_outputs: tuple[str, ...]
    onnx_batch: int
    provenance: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def thresholds(self) -> npt.NDArray[np.float64]:
        return np.array([lb.threshold for lb in self.labels], dtype=np.float64)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(lb.name for lb in self.labels)

    def prompt_embeddings(self) -> PromptEmbeddings:
        with np.load(self.prompts_path) as z:
            return PromptEmbeddings(
                torch.from_numpy(np.asarray(z["classify"], dtype=np.float32)),
                torch.from_numpy(np.asarray(z["locate"], dtype=np.float32)),
            )


# ---------------------------------------------------------------------------------------------
# Export


def _toml_clean(value: Any) -> Any:
    """TOML has no null and no NaN: drop None, turn non-finite floats into strings."""
    if isinstance(value, Mapping):
        return {str(k): _toml_clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_clean(v) for v in value if v is not None]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _resolve_checkpoint(source: str | Path) -> Path:
    p = Path(source)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    return p


@torch.no_grad()
def _validation_probabilities(
    model: RadFinder,
    preset: Preset,
    data: DataSpec,
    prompts: PromptEmbeddings,
    *,
    device: torch.device,
    batch: int,
    progress: bool,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], dict[str, Any]]:
    # seed 2: "synthetic:N" thresholds come from other validation patients than the set
    # ``evaluate`` draws by default (seed 1), so thresholds are never tuned on the test set.
    dataset = open_dataset(data, preset.space, split="valid", augment=None, seed=2)
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate)
    with Progress(len(dataset), "thresholds", enabled=progress, unit="vol") as bar:
        for b in loader:
            pred = model.predict(b.image.to(device), b.depth_valid.to(device), prompts)
            probs.append(pred.probabilities.float().cpu())
            labels.append(b.labels)
            bar.update(len(b))
    return (
        torch.cat(probs).numpy().astype(np.float64),
        torch.cat(labels).numpy().astype(np.int64),
        dataset.provenance(),
    )


def _onnx_parity(model: RadFinder, onnx_path: Path, prompts: PromptEmbeddings) -> float:
    """Largest absolute difference between ONNX Runtime and torch on a random volume: an
    export that changes the numbers must not ship."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    from engines.model.radfinder import VisionGraph

    g = torch.Generator().manual_seed(0)
    volume = torch.rand((1, 1, *model.space.shape), generator=g)
    valid = torch.ones((1, model.n_depth_tokens), dtype=torch.bool)
    valid[0, -1] = False  # exercise the padding mask too
    graph = VisionGraph(model, prompts).eval()
    with torch.no_grad():
        ref = [t.numpy() for t in graph(volume, valid)]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"volume": volume.numpy(), "depth_valid": valid.numpy()})
    return max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(got, ref, strict=True))


def export_bundle(
    run_dir_or_checkpoint: str | Path,
    out_dir: str | Path,
    *,
    validation_data: DataSpec | None = None,
    name: str | None = None,
    version: str | None = None,
    text_tower: TextTower | None = None,
    opset: int = 17,
    batch: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle from a training run folder (its last checkpoint) or a checkpoint file.

    ``validation_data`` (any ``open_dataset`` spec; ``split="valid"``) sets the thresholds by
    Youden's J; without it they are 0.5 and the bundle says so. The text tower is used once, to
    embed the prompts; the bundle itself never needs it to serve.
    """
    ckpt = _resolve_checkpoint(run_dir_or_checkpoint)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    model, preset, ck = load_model(ckpt, text_tower=text_tower, device=dev)

    with torch.no_grad():
        text = TextEncoder(model, cache=False)
        pos_f, neg_f = text.prompt_features()
        prompts = model.encode_prompts(pos_f, neg_f).detach()
    prompts_cpu = PromptEmbeddings(prompts.classify.cpu(), prompts.locate.cpu())
    classify_e, locate_e = prompts_cpu.ensemble()
    np.savez(
        out / _PROMPTS,
        classify=prompts_cpu.classify.numpy(),
        locate=prompts_cpu.locate.numpy(),
        classify_ensemble=classify_e.numpy(),
        locate_ensemble=locate_e.numpy(),
    )

    thresholds = [DEFAULT_THRESHOLD] * len(LABELS)
    methods = ["default"] * len(LABELS)
    threshold_info: dict[str, Any] = {
        "method": "default",
        "note": "no validation data was given: every threshold is 0.5, not tuned",
    }
    if validation_data is not None:
        probs, labels, val_prov = _validation_probabilities(
            model, preset, validation_data, prompts, device=dev, batch=batch, progress=progress
        )
        per: dict[str, Any] = {}
        for j, label in enumerate(LABELS):
            thr, info = youden_threshold(probs[:, j], labels[:, j], DEFAULT_THRESHOLD)
            thresholds[j] = float(min(max(thr, 0.0), 1.0))
            methods[j] = str(info["method"])
            per[label] = info
        n_tuned = sum(m == "youden" for m in methods)
        threshold_info = {
            "method": "youden",
            "note": f"Youden's J on the validation split; {n_tuned}/{len(LABELS)} labels tuned, "
            "the rest (a class missing in validation) 0.5",
            "validation_data": val_prov,
            "n_volumes": int(probs.shape[0]),
        }

    model_cpu = model.to("cpu").eval()
    save_checkpoint(
        out / _CHECKPOINT,
        model_cpu,
        preset,
        step=int(ck["step"]),
        extra={"train": ck.get("train", {}), "source_checkpoint": str(ckpt)},
    )
    outputs = export_vision_onnx(model_cpu, out / _ONNX, prompts=prompts_cpu, opset=opset)
    max_diff = _onnx_parity(model_cpu, out / _ONNX, prompts_cpu)
    if not max_diff <= MAX_ONNX_DIFF:
        raise BundleError(f"ONNX export differs from torch by {max_diff:.3g} (> {MAX_ONNX_DIFF})")

    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    files = {"checkpoint": _CHECKPOINT, "onnx": _ONNX, "prompt_embeddings": _PROMPTS}
    if (run_dir / _PRIOR).exists():
        shutil.copyfile(run_dir / _PRIOR, out / _PRIOR)
        files["depth_prior"] = _PRIOR

    pos, neg = disease_prompts(LABELS, PROMPT_TEMPLATES)
    label_rows = []
    for j, label in enumerate(LABELS):
        code, site = LABEL_CODES[label]
        row: dict[str, Any] = {
            "index": j,
            "name": label,
            **code.to_dict(),
            "threshold": thresholds[j],
            "threshold_method": methods[j],
            "prompts": {"positive": pos[j], "negative": neg[j]},
        }
        if site is not None:
            row["finding_site"] = site.to_dict()
        label_rows.append(row)

    train_info = dict(ck.get("train", {}))
    from engines.training.loop import _git_commit

    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "name": name or f"radfinder-{preset.name}",
        "version": version or f"0.1.0+step{int(ck['step'])}",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "feature_resolution_mm": float(preset.space.depth_token_mm),
        "files": files,
        "sha256": {k: sha256_file(out / v) for k, v in files.items()},
        "model": {
            "preset": preset.name,
            "embed_dim": int(model_cpu.embed_dim),
            "n_depth_tokens": int(model_cpu.n_depth_tokens),
            "localization_tau": float(model_cpu.localization_tau),
            "step": int(ck["step"]),
            "text_tower": ck.get("text_tower", {}),
        },
        "onnx": {
            "opset": int(opset),
            "batch": 1,
            "inputs": ["volume", "depth_valid"],
            "outputs": list(outputs),
            "input_shapes": {
                "volume": [1, 1, *preset.space.shape],
                "depth_valid": [1, preset.space.n_depth_tokens],
            },
            "prompts_baked_in": True,
            "max_abs_diff_vs_torch": max_diff,
        },
        "preprocessing": preset_to_dict(preset)["space"],
        "thresholds": threshold_info,
        "labels": label_rows,
        "provenance": {
            "training_data": train_info.get("data", {}),
            "seed": train_info.get("seed"),
            "total_steps": train_info.get("total_steps"),
            "batch": train_info.get("batch"),
            "accum": train_info.get("accum"),
            "world_size": train_info.get("world_size"),
            "localization_loss": train_info.get("localization"),
            "training_git_commit": train_info.get("git_commit"),
            "export_git_commit": _git_commit(),
            "source_checkpoint": str(ckpt),
            "source_checkpoint_sha256": sha256_file(ckpt),
            "torch": torch.__version__,
        },
        "preset": preset_to_dict(preset),
    }
    with (out / "bundle.toml").open("wb") as f:
        tomli_w.dump(_toml_clean(manifest), f)
    return load_bundle(out)


# ---------------------------------------------------------------------------------------------
# Load


def _need(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise BundleError(f"bundle.toml: missing {where}{key}")
    return d[key]


def _check_onnx(path: Path, preset: Preset, m: Mapping[str, Any]) -> None:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises several protobuf error types
        raise BundleError(f"{path.name}: not a readable ONNX model ({e})") from e
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 17:
        raise BundleError(f"{path.name}: opset {opset} < 17")
    shapes = {
        i.name: [
            d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim
        ]
        for i in proto.graph.input
    }
    want = {
        "volume": [int(m["batch"]), 1, *preset.space.shape],
        "depth_valid": [int(m["batch"]), preset.space.n_depth_tokens],
    }
    for k, v in want.items():
        if shapes.get(k) != v:
            raise BundleError(f"{path.name}: input {k} has shape {shapes.get(k)}, expected {v}")
    outs = [o.name for o in proto.graph.output]
    if outs != list(m["outputs"]):
        raise BundleError(f"{path.name}: outputs {outs} != bundle.toml {list(m['outputs'])}")


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and validate a bundle. ``verify`` (default) checks every file's SHA-256 and the
    ONNX graph's shapes against the preset; serving should never turn it off."""
    root = Path(path).resolve()
    toml_path = root / "bundle.toml"
    if not toml_path.exists():
        raise BundleError(f"{root}: no bundle.toml")
    try:
        m = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise BundleError(f"{toml_path}: {e}") from e
    if m.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{toml_path}: format is {m.get('format')!r}, not {BUNDLE_FORMAT!r}")
    if m.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"{toml_path}: format_version {m.get('format_version')} unsupported")
    for key in (
        "name",
        "version",
        "feature_resolution_mm",
        "files",
        "sha256",
        "onnx",
        "preprocessing",
        "thresholds",
        "labels",
        "provenance",
        "preset",
    ):
        _need(m, key, "")
    try:
        preset = preset_from_dict(m["preset"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"bundle.toml [preset]: {e}") from e
    if preset_to_dict(preset)["space"] != m["preprocessing"]:
        raise BundleError("bundle.toml: [preprocessing] disagrees with [preset.space]")
    if not math.isclose(float(m["feature_resolution_mm"]), preset.space.depth_token_mm):
        raise BundleError("bundle.toml: feature_resolution_mm is not the preset's depth token")

    files: dict[str, str] = dict(m["files"])
    for key in ("checkpoint", "onnx", "prompt_embeddings"):
        _need(files, key, "files.")
    for key, rel in files.items():
        f = root / rel
        if not f.is_file():
            raise BundleError(f"{root}: {rel} is missing")
        if verify:
            want = _need(m["sha256"], key, "sha256.")
            if sha256_file(f) != want:
                raise BundleError(f"{root}: {rel} does not match its SHA-256 in bundle.toml")

    rows = m["labels"]
    if [r.get("name") for r in rows] != list(LABELS):
        raise BundleError("bundle.toml: labels must be the 18 CT-RATE labels in DESIGN order")
    labels = []
    for j, r in enumerate(rows):
        thr = float(_need(r, "threshold", f"labels[{j}]."))
        if not 0.0 <= thr <= 1.0:
            raise BundleError(f"bundle.toml: threshold of {r['name']} is {thr}, not in [0, 1]")
        try:
            code = Code.from_dict(r)
        except KeyError as e:
            raise BundleError(f"bundle.toml: labels[{j}] lacks {e}") from e
        if code.scheme == "SCT" and (r["name"], code.value) not in {
            (lb, c.value) for lb, (c, _) in LABEL_CODES.items() if c.scheme == "SCT"
        }:
            raise BundleError(f"bundle.toml: {r['name']} has an unverified SNOMED code")
        site = r.get("finding_site")
        prompts = r.get("prompts", {})
        labels.append(
            BundleLabel(
                index=j,
                name=str(r["name"]),
                code=code,
                finding_site=Code.from_dict(site) if site else None,
                threshold=thr,
                threshold_method=str(r.get("threshold_method", "default")),
                positive_prompts=tuple(prompts.get("positive", ())),
                negative_prompts=tuple(prompts.get("negative", ())),
            )
        )

    onnx_m = m["onnx"]
    if verify:
        _check_onnx(root / files["onnx"], preset, onnx_m)
    with np.load(root / files["prompt_embeddings"]) as z:
        c, loc = z["classify"], z["locate"]
        p = preset.model.head.output_dim
        if c.ndim != 4 or c.shape[0] != len(LABELS) or c.shape[2:] != (2, p):
            raise BundleError(f"prompts.npz: classify has shape {c.shape}")
        if loc.shape != (c.shape[0], c.shape[1], p):
            raise BundleError(f"prompts.npz: locate has shape {loc.shape}")

    return Bundle(
        path=root,
        name=str(m["name"]),
        version=str(m["version"]),
        preset=preset,
        labels=tuple(labels),
        threshold_method=str(m["thresholds"].get("method", "default")),
        feature_resolution_mm=float(m["feature_resolution_mm"]),
        checkpoint_path=root / files["checkpoint"],
        onnx_path=root / files["onnx"],
        prompts_path=root / files["prompt_embeddings"],
        onnx_inputs=tuple(onnx_m.get("inputs", ("volume", "depth_valid"))),
        onnx_outputs=tuple(onnx_m["outputs"]),
        onnx_batch=int(onnx_m.get("batch", 1)),
        provenance=dict(m["provenance"]),
        manifest=m,
    )


def bundle_summary(bundle: Bundle) -> str:
    """One paragraph for logs and the CLI."""
    tuned = sum(lb.threshold_method == "youden" for lb in bundle.labels)
    data = bundle.provenance.get("training_data", {})
    return json.dumps(
        {
            "name": bundle.name,
            "version": bundle.version,
            "preset": bundle.preset.name,
            "feature_resolution_mm": bundle.feature_resolution_mm,
            "thresholds": f"{bundle.threshold_method} ({tuned} tuned)",
            "training_data": data.get("kind"),
        }
    )
