"""fl2t: continual, order-agnostic personalization of text-to-image diffusion models (FL2T)."""

from fl2t.config import LearnSettings, Settings
from fl2t.data import Concept, ConceptSpec, load_concept
from fl2t.errors import Fl2tError
from fl2t.experts import learn_expert
from fl2t.export import export_expert
from fl2t.library import Expert, Library
from fl2t.pipeline import ExpertPipeline

__version__ = "0.1.0"
__all__ = [
    "Concept",
    "ConceptSpec",
    "Expert",
    "ExpertPipeline",
    "Fl2tError",
    "LearnSettings",
    "Library",
    "Settings",
    "export_expert",
    "learn_expert",
    "load_concept",
]
