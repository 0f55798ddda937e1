"""The 18 abnormality labels of CT-RATE, in the dataset's column order.

The order is a contract (DESIGN §5): label vectors, model heads, bundle thresholds and SR codes
are all indexed by it, so it lives in one place and everything else imports it.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LABELS", "LABEL_INDEX", "label_index"]

LABELS: Final[tuple[str, ...]] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

LABEL_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(LABELS)}


def label_index(name: str) -> int:
    """Index of a label, with an error that lists the valid names (typos are common)."""
    try:
        return LABEL_INDEX[name]
    except KeyError:
        raise KeyError(f"unknown label {name!r}; expected one of {', '.join(LABELS)}") from None
