"""Concept datasets: the on-disk formats users have, validated before any training starts."""

from fl2t.data.concept import Concept, ConceptSpec, load_concept, load_image
from fl2t.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, caption_templates

__all__ = [
    "Concept",
    "ConceptSpec",
    "load_concept",
    "load_image",
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "caption_templates",
]
