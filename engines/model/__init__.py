"""The RadFinder model: vision tower, text tower, projection heads and prompt scoring."""

from engines.model.radfinder import (
    Prediction,
    ProjectionHead,
    PromptEmbeddings,
    RadFinder,
    RadFinderOutput,
    VisionGraph,
    VisionOutput,
    build_model,
    export_vision_onnx,
    score_labels,
)
from engines.model.text import (
    PROMPT_TEMPLATES,
    TextFeatureCache,
    TextTower,
    default_text_model_path,
    disease_prompts,
    strip_citations,
)
from engines.model.vision import VisionTower

__all__ = [
    "PROMPT_TEMPLATES",
    "Prediction",
    "ProjectionHead",
    "PromptEmbeddings",
    "RadFinder",
    "RadFinderOutput",
    "TextFeatureCache",
    "TextTower",
    "VisionGraph",
    "VisionOutput",
    "VisionTower",
    "build_model",
    "default_text_model_path",
    "disease_prompts",
    "export_vision_onnx",
    "score_labels",
    "strip_citations",
]
