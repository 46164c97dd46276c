"""fl2t: continual, order-agnostic personalization of text-to-image diffusion models (FL2T).

The public names are imported lazily, so `fl2t --help` and error paths do not pay for torch and diffusers.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "Concept": "fl2t.data",
    "ConceptSpec": "fl2t.data",
    "load_concept": "fl2t.data",
    "Expert": "fl2t.expert",
    "Library": "fl2t.library",
    "ExpertPipeline": "fl2t.pipeline",
    "FL2TPipeline": "fl2t.consolidate.pipeline",
    "ConsolidateSettings": "fl2t.config",
    "Fl2tError": "fl2t.errors",
    "LearnSettings": "fl2t.config",
    "Settings": "fl2t.config",
    "export_expert": "fl2t.export",
    "learn_expert": "fl2t.experts",
    "learn": "fl2t.learning",
    "consolidate_library": "fl2t.learning",
    "forget": "fl2t.learning",
    "open_library": "fl2t.learning",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fl2t' has no attribute {name!r}")
