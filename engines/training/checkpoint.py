"""Checkpoints: what a run saves, how a model is rebuilt from one.

A checkpoint is one ``torch.save`` dict readable with ``weights_only=True`` (only tensors and
plain Python values, no pickled classes), so loading a checkpoint from elsewhere cannot run
code. It carries the preset as plain data (``preset_to_dict``): the model is rebuilt from the
checkpoint alone, never from whatever the current code's preset happens to say.

A frozen text tower is not stored: it is the bundled encoder, named by its fingerprint, and
storing 90 MB of unchanged MiniLM weights in every checkpoint (and in every bundle) would be
waste. A trainable tower's weights are stored like the rest of the model.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from engines.data.labels import LABELS
from engines.model.radfinder import RadFinder, build_model
from engines.model.text import TextTower
from engines.presets import Preset, preset_from_dict, preset_to_dict

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "get_rng_state",
    "load_checkpoint",
    "load_model",
    "model_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMAT: Final = "radfinder-checkpoint"
CHECKPOINT_VERSION: Final = 1


class CheckpointError(ValueError):
    """A file that is not a checkpoint this code can rebuild a model from."""


def _frozen_text(model: RadFinder) -> bool:
    return model.text is not None and model.text.frozen


def model_state(model: RadFinder) -> dict[str, torch.Tensor]:
    """The model's weights on the CPU, without a frozen text tower."""
    skip = "text." if _frozen_text(model) else None
    return {
        k: v.detach().to("cpu").clone()
        for k, v in model.state_dict().items()
        if skip is None or not k.startswith(skip)
    }


def get_rng_state() -> dict[str, Any]:
    """Every global RNG a training step may draw from (dropout in a trainable text tower)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _python_state_plain(random.getstate()),
        "numpy": _numpy_state_plain(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_tuple(state["python"]))
    np.random.set_state(_numpy_state_tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _python_state_plain(s: tuple[Any, ...]) -> list[Any]:
    return [s[0], list(s[1]), s[2]]


def _python_state_tuple(s: list[Any]) -> tuple[Any, ...]:
    return (s[0], tuple(s[1]), s[2])


def _numpy_state_plain(s: Any) -> list[Any]:
    name, keys, pos, has_gauss, cached = s
    return [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
            int(has_gauss), float(cached)]


def _numpy_state_tuple(s: list[Any]) -> tuple[Any, ...]:
    keys = s[1].numpy().astype(np.uint32)
    return (s[0], keys, s[2], s[3], s[4])


def save_checkpoint(
    path: str | Path,
    model: RadFinder,
    preset: Preset,
    *,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write atomically (temporary file, then rename): a crash while saving never leaves a
    truncated file where the last good checkpoint was."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "preset": preset_to_dict(preset),
        "labels": list(LABELS),
        "step": int(step),
        "model": model_state(model),
        "text_tower": _text_fingerprint(model),
    }
    payload.update(extra or {})
    tmp = p.with_name(p.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, p)
    return p


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    """``dst`` becomes a copy of ``src`` in one rename."""
    d = Path(dst)
    tmp = d.with_name(d.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, d)


def _text_fingerprint(model: RadFinder) -> dict[str, Any]:
    if model.text is None:
        return {}
    return {
        "name": model.text.name,
        "max_length": model.text.max_length,
        "frozen": model.text.frozen,
        "stored": not model.text.frozen,
    }


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict, validated; ``weights_only`` so a file cannot run code."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt"
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    data = torch.load(p, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a {CHECKPOINT_FORMAT} file")
    if data.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{p}: checkpoint version {data.get('version')} is not supported")
    if list(data.get("labels", [])) != list(LABELS):
        raise CheckpointError(f"{p}: trained on other labels than the 18 CT-RATE labels")
    for key in ("preset", "model", "step"):
        if key not in data:
            raise CheckpointError(f"{p}: missing {key!r}")
    data["path"] = str(p)
    return data


def load_model(
    checkpoint: str | Path | Mapping[str, Any],
    *,
    text_tower: TextTower | None = None,
    load_text: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[RadFinder, Preset, dict[str, Any]]:
    """Rebuild ``(model, preset, checkpoint)`` in eval mode. ``load_text=False`` gives a model
    without a text tower (enough for the vision graph and stored prompt embeddings)."""
    data = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    preset = preset_from_dict(data["preset"])
    model = build_model(preset, text_tower=text_tower, load_text=load_text)
    missing, unexpected = model.load_state_dict(data["model"], strict=False)
    bad_missing = [k for k in missing if not (k.startswith("text.") and _frozen_text(model))]
    # Checkpoints from before text standardisation: their identity statistics are the defaults.
    bad_missing = [k for k in bad_missing if k not in ("text_mean", "text_std")]
    if not load_text:
        bad_missing = [k for k in bad_missing if not k.startswith("text.")]
        unexpected = [k for k in unexpected if not k.startswith("text.")]
    if bad_missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {bad_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    model.to(device).eval()
    return model, preset, data
